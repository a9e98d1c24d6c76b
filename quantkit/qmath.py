"""Symmetric INT8 quantization math: the one place where scales are defined.

Every scheme in quantkit is symmetric with the int8 range clipped to [-127, 127] (the value -128
is never produced, so negation is exact and the range is the same on both sides). A scale maps
int8 back to real values: ``x ~= q * scale``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import QuantkitError

# The int8 limit: values are clipped to [-QMAX, QMAX].
QMAX = 127
# A channel or token that is all zeros would give a zero scale and a division by zero; any
# positive scale quantizes zeros exactly, so clamp the abs-max from below.
EPS = 1e-8


def abs_max_scale(amax: torch.Tensor) -> torch.Tensor:
    """Scale (fp32) that maps ``amax`` onto the int8 limit."""
    return amax.float().clamp_min(EPS) / QMAX


def quantize_to_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale)`` clipped to [-127, 127], in int8. ``scale`` broadcasts against ``x``.

    The division happens in fp32 whatever the input dtype, so bf16/fp16 inputs round the same way
    as on the fast paths, which also work in fp32.
    """
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


# Elements per block of rows in quantize_weight_per_channel (16 MiB of fp32 temporaries).
_BLOCK_ELEMENTS = 2**22


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric round-to-nearest.

    Args:
        weight: float ``[out, in]``.

    Returns:
        ``(q, scale)``: int8 ``[out, in]`` and fp32 ``[out]`` with ``weight ~= q * scale[:, None]``.

    Raises:
        QuantkitError: the weight holds NaN or Inf (its int8 form would be garbage).
    """
    w = weight.detach()
    return quantize_row_blocks(tuple(w.shape), lambda start, stop: w[start:stop], w.device)


def quantize_row_blocks(
    shape: tuple[int, int], rows: Callable[[int, int], torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_weight_per_channel` of an ``[out, in]`` weight given a block of rows at a time.

    ``rows(start, stop)`` returns the float rows ``start:stop``; no more than a few MiB of them are asked
    for at once, so the fp32 temporaries stay small and the weight itself need never be in memory
    whole (e.g. rows read straight from a checkpoint). Each row comes out as in one piece.
    """
    q = torch.empty(shape, dtype=torch.int8, device=device)  # row-major, whatever the source layout
    scale = torch.empty(shape[0], dtype=torch.float32, device=device)
    step = max(1, _BLOCK_ELEMENTS // max(shape[1], 1))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        block = rows(start, stop)
        scale[start:stop] = abs_max_scale(block.abs().amax(dim=1))
        q[start:stop] = quantize_to_int8(block, scale[start:stop, None])
    if not scale.is_meta and not torch.isfinite(scale).all():  # NaN: a NaN scale; Inf: an infinite one
        raise QuantkitError("a weight to quantize holds NaN or Inf values; the model is damaged")
    return q, scale


def all_finite(t: torch.Tensor, block: int = 2**22) -> bool:
    """Whether every value of ``t`` is finite, checked ``block`` values at a time: the check of a
    large table never allocates a mask of its size."""
    flat = t.detach().reshape(-1)
    upcast = flat.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # e.g. float8
    return all(
        bool(torch.isfinite(flat[i : i + block].float() if upcast else flat[i : i + block]).all())
        for i in range(0, flat.numel(), block)
    )


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) quantization of activations ``[..., K]``.

    Returns ``(q, scale)`` with ``scale`` of shape ``[..., 1]`` in fp32.
    """
    scale = abs_max_scale(x.detach().abs().amax(dim=-1, keepdim=True))
    return quantize_to_int8(x, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` computed in fp32, then cast to ``dtype``."""
    return (q.float() * scale).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
