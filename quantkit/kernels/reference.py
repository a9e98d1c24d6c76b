"""Reference implementations of the quantized linear ops: correct for every shape, dtype and device.

These are the oracle every fast path is tested against, and the fallback when no fast path takes a
shape. They are plain PyTorch, written for clarity rather than speed.

The op contracts they implement are stated once, for every backend, by
:class:`quantkit.kernels.W8A16Op` and :class:`quantkit.kernels.W8A8Op`.
"""

from __future__ import annotations

import torch

from ..qmath import dequantize, quantize_per_token, quantize_to_int8


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 ``[M, K]`` times int8 ``[N, K]`` transposed, exact, into int32 ``[M, N]``."""
    # int32 products of int8 values are exact, and so are their sums until |sum| > 2^31:
    # K * 127 * 127 < 2^31 holds for K up to 133,000, far beyond any hidden size.
    return a.to(torch.int32) @ b.to(torch.int32).T


def quantize_activations(
    x2d: torch.Tensor, smooth_inv: torch.Tensor | None, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations and their fp32 scale (``[M, 1]`` per token, or the static scalar)."""
    xf = x2d.float()
    if smooth_inv is not None:
        xf = xf * smooth_inv
    if input_scale is None:
        return quantize_per_token(xf)
    scale = input_scale.float().reshape(1, 1)
    return quantize_to_int8(xf, scale), scale


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_activations(x2d, smooth_inv, input_scale)
    acc = int8_mm(xq, weight)
    # Rescale the int32 accumulator in fp32: the product of two scales can be far below bf16's
    # resolution for small activations, and fp32 keeps the epilogue exact to ~1e-7 relative.
    y = acc.float() * x_scale * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize(weight, weight_scale[:, None], x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    seqs = sequences(x)
    if seqs.shape[0] <= 1:
        return torch.nn.functional.linear(x, w, b)
    # One GEMM per sequence: the float GEMM may round differently for other row counts (MKL and
    # oneDNN choose kernels by M), and a sequence's outputs must not depend on the rest of the batch.
    out = torch.stack([torch.nn.functional.linear(s, w, b) for s in seqs])
    return out.reshape(*x.shape[:-1], weight.shape[0])


def sequences(x: torch.Tensor) -> torch.Tensor:
    """``x [..., L, K]`` as ``[B, L, K]``: the batch's sequences (a 2-D ``[M, K]`` is one sequence of M rows)."""
    k = x.shape[-1]
    rows = rows_per_sequence(x)
    return x.reshape(-1, rows, k) if rows else x.reshape(0, 0, k)


def rows_per_sequence(x: torch.Tensor) -> int:
    """Tokens per sequence of an activation ``[..., L, K]``; a 2-D ``[M, K]`` is one sequence of M rows.

    Batch invariance: every fast path chooses its kernel (and the kernel its tiles and K split) from
    this and the weight's shape, never from the batch size, so that a sequence's outputs are the same
    alone or in any batch.
    """
    return x.shape[-2] if x.dim() >= 2 else 1
