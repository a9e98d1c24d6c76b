"""Triton kernels for the two quantized linear ops, registered for CUDA above ``torch._int_mm``.

This module launches the kernels of :mod:`quantkit.kernels.triton_jit` (which explains their design
and why their int8 activations equal the reference's): block-size configs and autotuning, the
split-K heuristic, the Python wrappers :func:`w8a16_linear` and :func:`w8a8_linear`, and their
``supports`` predicates and registration.

Block sizes are autotuned on CUDA (``triton.autotune`` keyed on the row-count bucket, N, K and
SPLIT_K); on CPU tensors, which only happen under ``TRITON_INTERPRET=1`` in tests, a fixed small
config is used.

Batch invariance: the regime (decode or prefill configs), the autotuning bucket and the split-K
factor are chosen from the tokens per sequence (:func:`~quantkit.kernels.reference.rows_per_sequence`),
not from the rows of the whole batch. They set the order in which a row's K products are summed
(BLOCK_K and the split); with them fixed, a sequence's outputs are the same alone or in any batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..qmath import QMAX
from .reference import rows_per_sequence
from .registry import Impl
from .triton_jit import quantize_rows_kernel, splitk_epilogue_kernel, w8a8_kernel, w8a16_kernel

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# int32 sums of int8 x int8 products are exact while K * 127 * 127 < 2^31.
W8A8_MAX_K = (2**31 - 1) // (QMAX * QMAX)
# Decode: at most this many rows take the small-BLOCK_M configs and split-K.
DECODE_MAX_ROWS = 16
MAX_SPLIT_K = 16
# Split-K stops halving once a chunk of K would drop below this: each program then still streams
# at least this many weight bytes per row of its tile, enough to amortize its prologue/epilogue.
MIN_K_PER_SPLIT = 512


# ----------------------------------------------------------------------------------------------
# Configs and autotuning
# ----------------------------------------------------------------------------------------------


def _even_k(args: dict) -> bool:
    # Every split sees only whole, in-range BLOCK_K tiles: the K loop can drop its masks.
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# Every config below was compiled for sm_90 with Triton 3.9 (bf16, bias, smooth_inv, K % BLOCK_K == 0):
# no register spills and shared memory within the 227 KB per-block limit. None has been timed yet.
#
# Decode: BLOCK_M = 16 is the smallest tile tl.dot takes; rows past M cost tensor-core time, which
# decode has to spare (it waits on weight bytes). Deep K tiles keep many weight bytes in flight.
_W8A16_DECODE = [
    _cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3),
    _cfg(16, 128, 128, 4, 3), _cfg(16, 128, 256, 8, 3), _cfg(16, 64, 512, 8, 2),
]  # fmt: skip
_W8A16_PREFILL = [
    _cfg(32, 64, 128, 4, 4), _cfg(32, 128, 128, 4, 4), _cfg(64, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4),
    _cfg(64, 128, 128, 4, 3), _cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 128, 8, 3),
]  # fmt: skip
# int8 tiles are half the bytes of bf16 ones, so K tiles are twice as deep for the same shared memory;
# tl.dot on int8 needs BLOCK_K >= 32. The fused quantization holds an fp32 copy of the A tile in
# registers: 128x256 tiles with BLOCK_K = 128 spill there, so the widest prefill tile uses BLOCK_K = 64.
_W8A8_DECODE = [
    _cfg(16, 32, 256, 4, 4), _cfg(16, 64, 128, 4, 4), _cfg(16, 64, 256, 4, 3),
    _cfg(16, 128, 128, 4, 3), _cfg(16, 128, 256, 8, 3),
]  # fmt: skip
_W8A8_PREFILL = [
    _cfg(32, 64, 256, 4, 4), _cfg(32, 128, 128, 4, 4), _cfg(64, 128, 128, 4, 4), _cfg(64, 256, 128, 8, 3),
    _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 64, 8, 4),
]  # fmt: skip
# CPU tensors only occur under TRITON_INTERPRET=1 (tests), where autotuning cannot time anything.
_INTERPRETER_CONFIG = _cfg(16, 64, 64, 4, 1)


def _prune_by_rows(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    # A row tile much taller than M only multiplies padding: keep BLOCK_M <= max(32, M bucket).
    limit = max(32, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit] or configs[:1]


def _autotuned(fn: triton.runtime.Heuristics, configs: list[triton.Config], prune: bool) -> triton.runtime.Autotuner:
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune_by_rows} if prune else None,
    )(fn)


_w8a16_heur = triton.heuristics({"EVEN_K": _even_k})(w8a16_kernel)
_w8a8_heur = triton.heuristics({"EVEN_K": _even_k})(w8a8_kernel)
_W8A16_TUNED = {
    "decode": _autotuned(_w8a16_heur, _W8A16_DECODE, prune=False),
    "prefill": _autotuned(_w8a16_heur, _W8A16_PREFILL, prune=True),
}
_W8A8_TUNED = {
    "decode": _autotuned(_w8a8_heur, _W8A8_DECODE, prune=False),
    "prefill": _autotuned(_w8a8_heur, _W8A8_PREFILL, prune=True),
}


def autotune_choices() -> dict[str, dict[str, str]]:
    """The config the autotuner picked for each key seen so far, for benchmark reports."""
    tuned = {f"w8a16_{regime}": fn for regime, fn in _W8A16_TUNED.items()}
    tuned |= {f"w8a8_{regime}": fn for regime, fn in _W8A8_TUNED.items()}
    return {name: {str(key): str(cfg) for key, cfg in fn.cache.items()} for name, fn in tuned.items()}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_split_k(rows: int, n: int, k: int, device: torch.device) -> int:
    """Split-K factor for ``rows`` tokens per sequence: >1 only at decode, when too few output tiles fill the GPU.

    Doubles the split until there are about two programs per SM (counted with a nominal BLOCK_N
    of 64), without cutting K into chunks shorter than ``MIN_K_PER_SPLIT``. N = 14336 at M = 1
    already has 224 tiles; N = 4096 (down_proj) has 64 and gets split. A heuristic, not a tuned
    table: the autotuner then picks the tiles for the chosen split.
    """
    if rows > DECODE_MAX_ROWS or device.type != "cuda":
        return 1
    tiles = triton.cdiv(rows, 16) * triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * _sm_count(device) and k // (2 * split) >= MIN_K_PER_SPLIT and split < MAX_SPLIT_K:
        split *= 2
    return split


def _m_bucket(rows: int) -> int:
    # Autotuning key for the row count: powers of two, so each prompt length does not re-tune.
    return min(triton.next_power_of_2(rows), 4096)


def _launch(
    tuned: dict[str, triton.runtime.Autotuner],
    heur: triton.runtime.Heuristics,
    config: triton.Config | None,
    grid_args: tuple[int, int, int, int],
    *args: object,
    **kwargs: object,
) -> None:
    """Run ``heur`` with an explicit config, the interpreter config, or through the autotuner.

    ``grid_args``: rows of the whole batch (the grid), N, the split, and the tokens per sequence (the
    regime: see the module docstring on batch invariance).
    """
    rows, n, split_k, seq_rows = grid_args

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    device_is_cuda = isinstance(args[0], torch.Tensor) and args[0].is_cuda
    if config is None and not device_is_cuda:
        config = _INTERPRETER_CONFIG
    if config is not None:
        heur[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned["decode" if seq_rows <= DECODE_MAX_ROWS else "prefill"][grid](*args, **kwargs)


def _finish_split_k(
    part: torch.Tensor,
    row_scale: torch.Tensor | None,
    row_scale_stride: int,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Sum the split-K partials in order and apply the epilogue (a small, separate launch)."""
    split_k, rows, n = part.shape
    block_m, block_n = 16, 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    splitk_epilogue_kernel[grid](
        part, row_scale, row_scale_stride, w_scale, bias, out, rows, n,
        SPLIT_K=split_k, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        BF16_RNE=_bf16_rne(out), BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _bf16_rne(x: torch.Tensor) -> bool:
    # The Triton interpreter (CPU tensors, tests only) keeps bf16 as raw uint16 and casts fp32 -> bf16
    # by truncation; the epilogue then rounds to nearest even itself. CUDA never needs it.
    return not x.is_cuda and x.dtype == torch.bfloat16


def _prepare(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` as rows ``[M, K]`` with unit stride along K, an empty output ``[M, N]`` in ``x.dtype``, fp32 scales."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    return x2d, out, weight_scale.reshape(-1).float().contiguous()


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def w8a16_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` with the weight kept int8 in memory.

    Contract: :class:`quantkit.kernels.W8A16Op`. ``split_k`` and ``config``
    (a ``triton.Config`` with BLOCK_M/N/K, GROUP_M) override the heuristic and the autotuner; they
    exist for tests and benchmarks, the dispatcher never passes them.
    """
    n, k = weight.shape
    x2d, out, w_scale = _prepare(x, weight, weight_scale)
    rows = x2d.shape[0]
    if rows == 0:
        return out.reshape(*x.shape[:-1], n)
    bias = None if bias is None else bias.reshape(-1).to(x.dtype).contiguous()
    seq_rows = rows_per_sequence(x)
    split_k = split_k or pick_split_k(seq_rows, n, k, x.device)
    dest = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.float32, device=x.device)
    _launch(
        _W8A16_TUNED, _w8a16_heur, config, (rows, n, split_k, seq_rows),
        x2d, weight, w_scale, bias, dest, rows, n, k, x2d.stride(0), _m_bucket(seq_rows),
        HAS_BIAS=bias is not None, SPLIT_K=split_k,
        # The interpreter multiplies bf16 tiles as their raw uint16 bits, so it gets fp32 tiles
        # (bf16 -> fp32 and int8 -> fp32 are exact); on CUDA the dot runs in the activation dtype.
        DOT_DTYPE=tl.float32 if _bf16_rne(x) else _TL_DTYPES[x.dtype],
        # fp32 activations: a true fp32 dot, not TF32 (16-bit inputs ignore the setting).
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        BF16_RNE=_bf16_rne(x),
    )  # fmt: skip
    if split_k > 1:
        _finish_split_k(dest, None, 0, w_scale, bias, out)
    return out.reshape(*x.shape[:-1], n)


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    prequantize: bool = False,
    split_k: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """int8 activations (quantized inside the GEMM) x int8 weights -> int32 -> fp32 rescale.

    Contract: :class:`quantkit.kernels.W8A8Op`. ``prequantize=True`` quantizes
    the activations in a separate kernel first (the unfused design, for comparison);
    ``split_k``/``config`` override the heuristic and the autotuner (tests and benchmarks only).
    """
    n, k = weight.shape
    x2d, out, w_scale = _prepare(x, weight, weight_scale)
    rows = x2d.shape[0]
    if rows == 0:
        return out.reshape(*x.shape[:-1], n)
    smooth = None if smooth_inv is None else smooth_inv.reshape(-1).float().contiguous()
    in_scale = None if input_scale is None else input_scale.reshape(1).float()
    static = in_scale is not None
    seq_rows = rows_per_sequence(x)
    split_k = split_k or pick_split_k(seq_rows, n, k, x.device)

    row_scale = None
    if prequantize:
        x_q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
        row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_m = 4
        quantize_rows_kernel[(triton.cdiv(rows, block_m),)](
            x2d, smooth, in_scale, x_q, row_scale, rows, k, x2d.stride(0),
            HAS_SMOOTH=smooth is not None, STATIC_SCALE=static,
            BLOCK_M=block_m, BLOCK_K=min(1024, triton.next_power_of_2(k)),
        )  # fmt: skip
        x2d, static = x_q, False
    elif split_k > 1 and not static:
        row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)

    dest = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.int32, device=x.device)
    _launch(
        _W8A8_TUNED, _w8a8_heur, config, (rows, n, split_k, seq_rows),
        x2d, weight, w_scale, bias, smooth, in_scale, row_scale, dest, rows, n, k, x2d.stride(0),
        _m_bucket(seq_rows),
        HAS_BIAS=bias is not None, HAS_SMOOTH=smooth is not None and not prequantize,
        STATIC_SCALE=static, PREQUANTIZED=prequantize, SPLIT_K=split_k, BF16_RNE=_bf16_rne(out),
    )  # fmt: skip
    if split_k > 1:
        if static:
            _finish_split_k(dest, in_scale, 0, w_scale, bias, out)
        else:
            _finish_split_k(dest, row_scale, 1, w_scale, bias, out)
    return out.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def _supports_common(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if x.dtype not in _FLOAT_DTYPES or x.dim() == 0 or x.device != weight.device:
        return False
    n, k = weight.shape
    if x.shape[-1] != k or n == 0 or k == 0 or x.numel() == 0:
        return False
    rows = x.numel() // k
    # Offsets inside the kernels are int32: bound every tensor they index (x by the memory its view
    # spans, which may exceed numel for a strided view), split-K partials included.
    x_span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True))
    partials = MAX_SPLIT_K if rows_per_sequence(x) <= DECODE_MAX_ROWS else 1
    return max(x_span, x.numel(), weight.numel(), rows * n * partials) < 2**31


def w8a16_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16/fp16/fp32 activations, contiguous 2-D int8 weight [N, K], any M, N, K (int32-indexable)."""
    return _supports_common(x, weight)


def w8a8_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """As :func:`w8a16_supports`, and K <= ``W8A8_MAX_K`` so the int32 accumulator is exact."""
    return _supports_common(x, weight) and weight.shape[1] <= W8A8_MAX_K


def register_all(register: Callable[[str, Impl], None]) -> None:
    register("w8a16", Impl("triton", "cuda", w8a16_linear, w8a16_supports, priority=20))
    register("w8a8", Impl("triton", "cuda", w8a8_linear, w8a8_supports, priority=20))
