"""Triton kernels for the two quantized linear ops, registered for CUDA above ``torch._int_mm``.

Both kernels keep the int8 weight int8 all the way into registers: a tile of ``weight`` ([N, K],
row-major, so every row is contiguous along K) is loaded as int8 and only then converted or fed to
the tensor cores. Nothing the size of the weight is ever written back to memory, which is the whole
point of INT8 weights at decode, where the op is bound by the bytes of weight streamed per token.

``w8a16_linear`` (weight-only)
    ``acc += x_tile @ float(w_tile)`` in fp32, with the int8 -> bf16/fp16 conversion done in registers
    (exact: |q| <= 127 fits both formats), and the per-output-channel scale applied once per output
    element in the epilogue instead of once per weight element: ``y = acc * w_scale[n] + bias``. The
    products ``x * q`` are exact in fp32, so the kernel is slightly *more* accurate than the reference,
    which rounds the dequantized weight to the activation dtype first. Decode (M <= 16) uses
    BLOCK_M = 16 and split-K: a decode GEMM has only ``N / BLOCK_N`` output tiles (64 for
    down_proj, N = 4096), too few to keep every SM streaming weights, so K is cut into ``SPLIT_K``
    contiguous chunks that run as separate programs and write fp32 partial sums, reduced in a fixed
    order by a small epilogue kernel (deterministic, unlike atomics).

``w8a8_linear`` (int8 x int8 -> int32, fused dynamic activation quantization)
    The per-token activation quantization runs inside the GEMM rather than as a separate pass that
    writes int8 activations and scales to memory and reads them back: each program first sweeps its
    BLOCK_M rows over the whole of K for their abs-max (after ``smooth_inv``), turns that into the
    fp32 per-row scale exactly as :func:`quantkit.qmath.abs_max_scale` does, then quantizes every
    A tile on the fly in the K loop and multiplies it with the int8 weight tile into an int32
    accumulator (``tl.dot(..., out_dtype=tl.int32)``). The epilogue rescales in fp32:
    ``y = float(acc) * row_scale[m] * w_scale[n] + bias``. With a static ``input_scale`` the sweep
    is skipped. The price of the fusion is that every program along N re-reads and re-quantizes
    the same rows; ``prequantize=True`` runs the same GEMM on activations quantized once by a
    separate row kernel, so the two designs can be compared on hardware (see eval/bench_kernels.py).

Bit-exactness of the int8 activations: the abs-max is exact, and the two divisions that follow
(``amax / 127`` and ``x / scale``) use ``tl.math.div_rn``, IEEE round-to-nearest like PyTorch's fp32
division (Triton's plain ``/`` on fp32 is not guaranteed to be correctly rounded on NVIDIA GPUs; it
has lowered to ``div.full.f32``, accurate to 2 ulp). The rounding to an integer is round-half-to-even
like ``torch.round`` (see :func:`_round_half_even`). So the int8 activations, and hence the int32
accumulator, equal the reference's; the outputs differ only by the fp32 epilogue (a fused
multiply-add where the reference rounds twice) before the final cast.

All offsets are int32, which ``supports`` guarantees by bounding the tensor sizes. Block sizes are
autotuned on CUDA (``triton.autotune`` keyed on the row-count bucket, N, K and SPLIT_K); on CPU
tensors, which only happen under ``TRITON_INTERPRET=1`` in tests, a fixed small config is used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..qmath import QMAX
from . import Impl

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
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    # Round to the nearest integer, ties to even, like torch.round. Adding 1.5 * 2^23 moves v into
    # [2^23, 2^24), where consecutive fp32 values are exactly 1 apart, so the IEEE round-to-nearest-
    # even of the addition *is* the rounding of v; subtracting the constant back is exact. Valid for
    # |v| <= 2^22 (callers clamp to [-127, 127] first). libdevice.rint would do the same on the GPU
    # but has no implementation in the Triton interpreter, which the CPU tests run on.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_tile(a, scale):
    # quantkit.qmath.quantize_to_int8: round(a / scale) clamped to [-127, 127]. Clamping before the
    # rounding gives the same result (the bounds are integers) and keeps the rounding trick in range.
    v = tl.math.div_rn(a, scale)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return _round_half_even(v).to(tl.int8)


@triton.jit
def _load_act_f32(x_ptrs, k, K, smooth_ptr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr):
    """An activation tile in fp32, times ``smooth_inv`` along K when given (zero past K)."""
    if EVEN_K:
        a = tl.load(x_ptrs).to(tl.float32)
    else:
        a = tl.load(x_ptrs, mask=(k < K)[None, :], other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + k, mask=k < K, other=0.0)
        a = a * s[None, :]
    return a


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks sweep N together, so the weight tiles they share are
    # still in L2 when the next row-block asks for them (matters at prefill, a no-op at decode).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _round_fp32_to_bf16(y):
    # fp32 -> nearest-even bf16 value, still in fp32 (so the cast that follows is exact). Only for the
    # interpreter, whose fp32 -> bf16 cast truncates; on the GPU the cast itself rounds this way.
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_scaled(
    y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, BF16_RNE: tl.constexpr
):
    """Epilogue shared by every kernel: ``y * w_scale[n] + bias[n]`` in fp32, cast, masked store."""
    n_mask = offs_n < N
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = y * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if BF16_RNE:
        y = _round_fp32_to_bf16(y)
    ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


def _even_k(args: dict) -> bool:
    # Every split sees only whole, in-range BLOCK_K tiles: the K loop can drop its masks.
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BF16_RNE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge load a valid row/column instead (wrapped), so only K needs a mask
    # in the loop; their results are never stored.
    rows = offs_m % M
    cols = offs_n % N
    # This program's contiguous chunk of K: k_tiles whole BLOCK_K tiles starting at k_start.
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = pid_k * k_tiles * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    # The weight tile is read as [BLOCK_K, BLOCK_N] straight from the [N, K] layout: contiguous along
    # K, which is also the K-major operand layout the tensor cores want.
    w_ptrs = w_ptr + cols[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_tiles):
        if EVEN_K:
            a = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K
            a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0)
        # The dequantization: int8 -> activation dtype in registers (exact), scale deferred to the
        # epilogue. The weight never exists in memory in any format but int8.
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    if SPLIT_K == 1:
        _store_scaled(acc, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BF16_RNE)
    else:
        # Unscaled fp32 partial sums into [SPLIT_K, M, N]; _splitk_epilogue_kernel finishes.
        ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _w8a8_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, smooth_ptr, in_scale_ptr, row_scale_ptr, out_ptr,
    M, N, K, stride_xm, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC_SCALE: tl.constexpr,
    PREQUANTIZED: tl.constexpr, SPLIT_K: tl.constexpr, BF16_RNE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # x_ptr: float activations, or int8 ones with their scales in row_scale_ptr when PREQUANTIZED.
    # With SPLIT_K > 1, out_ptr is an int32 [SPLIT_K, M, N] partial buffer and (dynamic, fused case)
    # the per-row scales are written to row_scale_ptr for the epilogue kernel.
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    x_rows = x_ptr + rows[:, None] * stride_xm

    # Per-row activation scale [BLOCK_M], fp32.
    if STATIC_SCALE:
        row_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(in_scale_ptr)
    elif PREQUANTIZED:
        row_scale = tl.load(row_scale_ptr + rows)
    else:
        # Fused prologue: abs-max of these rows over the *whole* of K (also under split-K, so every
        # split quantizes with the same scale), then quantkit.qmath.abs_max_scale.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _load_act_f32(x_rows + k[None, :], k, K, smooth_ptr, HAS_SMOOTH, False)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        row_scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        if SPLIT_K > 1:
            if (pid_n == 0) & (pid_k == 0):
                tl.store(row_scale_ptr + offs_m, row_scale, mask=offs_m < M)

    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, k_tiles):
        if PREQUANTIZED:
            if EVEN_K:
                a_q = tl.load(x_rows + offs_k[None, :])
            else:
                a_q = tl.load(x_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0)
        else:
            a = _load_act_f32(x_rows + offs_k[None, :], offs_k, K, smooth_ptr, HAS_SMOOTH, EVEN_K)
            # Padding columns are 0 and quantize to 0, so they add nothing to the accumulator.
            a_q = _quantize_tile(a, row_scale[:, None])
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(offs_k < K)[:, None], other=0)
        # int8 x int8 on the tensor cores, exact in int32 (K <= W8A8_MAX_K, checked by supports).
        acc += tl.dot(a_q, w, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K

    if SPLIT_K == 1:
        # Rescale in fp32, in the reference's order: (acc * row_scale) * w_scale + bias.
        y = acc.to(tl.float32) * row_scale[:, None]
        _store_scaled(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BF16_RNE)
    else:
        ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _splitk_epilogue_kernel(
    part_ptr, row_scale_ptr, row_scale_stride, w_scale_ptr, bias_ptr, out_ptr, M, N,
    SPLIT_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Sums the SPLIT_K partials in a fixed order (int32 partials: exactly; fp32: deterministically),
    # then applies the same epilogue as the unsplit kernels. row_scale_stride 0 broadcasts a static
    # per-tensor scale.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0)
    y = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + offs_m * row_scale_stride, mask=offs_m < M, other=0.0)
        y = y * row_scale[:, None]
    _store_scaled(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BF16_RNE)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, in_scale_ptr, xq_ptr, scale_ptr, M, K, stride_xm,
    HAS_SMOOTH: tl.constexpr, STATIC_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # The unfused alternative (prequantize=True): activations quantized once, written as int8.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = x_ptr + (offs_m % M)[:, None] * stride_xm
    if STATIC_SCALE:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(in_scale_ptr)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _load_act_f32(x_rows + k[None, :], k, K, smooth_ptr, HAS_SMOOTH, False)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
    tl.store(scale_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_act_f32(x_rows + k[None, :], k, K, smooth_ptr, HAS_SMOOTH, False)
        q = _quantize_tile(a, scale[:, None])
        tl.store(xq_ptr + offs_m[:, None] * K + k[None, :], q, mask=m_mask[:, None] & (k < K)[None, :])


# ----------------------------------------------------------------------------------------------
# Configs and autotuning
# ----------------------------------------------------------------------------------------------


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


_w8a16_heur = triton.heuristics({"EVEN_K": _even_k})(_w8a16_kernel)
_w8a8_heur = triton.heuristics({"EVEN_K": _even_k})(_w8a8_kernel)
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
    """Split-K factor for a call: >1 only at decode, when too few output tiles fill the GPU.

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
    grid_args: tuple[int, int, int],
    *args: object,
    **kwargs: object,
) -> None:
    """Run ``heur`` with an explicit config, the interpreter config, or through the autotuner."""
    rows, n, split_k = grid_args

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    device_is_cuda = isinstance(args[0], torch.Tensor) and args[0].is_cuda
    if config is None and not device_is_cuda:
        config = _INTERPRETER_CONFIG
    if config is not None:
        heur[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned["decode" if rows <= DECODE_MAX_ROWS else "prefill"][grid](*args, **kwargs)


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
    _splitk_epilogue_kernel[grid](
        part, row_scale, row_scale_stride, w_scale, bias, out, rows, n,
        SPLIT_K=split_k, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        BF16_RNE=_bf16_rne(out), BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _bf16_rne(x: torch.Tensor) -> bool:
    # The Triton interpreter (CPU tensors, tests only) keeps bf16 as raw uint16 and casts fp32 -> bf16
    # by truncation; the epilogue then rounds to nearest even itself. CUDA never needs it.
    return not x.is_cuda and x.dtype == torch.bfloat16


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


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

    Same contract as :func:`quantkit.kernels.reference.w8a16_linear`. ``split_k`` and ``config``
    (a ``triton.Config`` with BLOCK_M/N/K, GROUP_M) override the heuristic and the autotuner; they
    exist for tests and benchmarks, the dispatcher never passes them.
    """
    n, k = weight.shape
    x2d = _as_2d(x)
    rows = x2d.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*x.shape[:-1], n)
    w_scale = weight_scale.reshape(-1).float().contiguous()
    bias = None if bias is None else bias.reshape(-1).to(x.dtype).contiguous()
    split_k = split_k or pick_split_k(rows, n, k, x.device)
    dest = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.float32, device=x.device)
    _launch(
        _W8A16_TUNED, _w8a16_heur, config, (rows, n, split_k),
        x2d, weight, w_scale, bias, dest, rows, n, k, x2d.stride(0), _m_bucket(rows),
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

    Same contract as :func:`quantkit.kernels.reference.w8a8_linear`. ``prequantize=True`` quantizes
    the activations in a separate kernel first (the unfused design, for comparison);
    ``split_k``/``config`` override the heuristic and the autotuner (tests and benchmarks only).
    """
    n, k = weight.shape
    x2d = _as_2d(x)
    rows = x2d.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*x.shape[:-1], n)
    w_scale = weight_scale.reshape(-1).float().contiguous()
    smooth = None if smooth_inv is None else smooth_inv.reshape(-1).float().contiguous()
    in_scale = None if input_scale is None else input_scale.reshape(1).float()
    static = in_scale is not None
    split_k = split_k or pick_split_k(rows, n, k, x.device)

    row_scale = None
    if prequantize:
        x_q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
        row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_m = 4
        _quantize_rows_kernel[(triton.cdiv(rows, block_m),)](
            x2d, smooth, in_scale, x_q, row_scale, rows, k, x2d.stride(0),
            HAS_SMOOTH=smooth is not None, STATIC_SCALE=static,
            BLOCK_M=block_m, BLOCK_K=min(1024, triton.next_power_of_2(k)),
        )  # fmt: skip
        x2d, static = x_q, False
    elif split_k > 1 and not static:
        row_scale = torch.empty(rows, dtype=torch.float32, device=x.device)

    dest = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.int32, device=x.device)
    _launch(
        _W8A8_TUNED, _w8a8_heur, config, (rows, n, split_k),
        x2d, weight, w_scale, bias, smooth, in_scale, row_scale, dest, rows, n, k, x2d.stride(0),
        _m_bucket(rows),
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
    partials = MAX_SPLIT_K if rows <= DECODE_MAX_ROWS else 1
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
