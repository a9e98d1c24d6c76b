"""The ``@triton.jit`` kernels behind :mod:`quantkit.kernels.triton_kernels`, and their device helpers.

Both GEMM kernels keep the int8 weight int8 all the way into registers: a tile of ``weight`` ([N, K],
row-major, so every row is contiguous along K) is loaded as int8 and only then converted or fed to
the tensor cores. Nothing the size of the weight is ever written back to memory, which is the whole
point of INT8 weights at decode, where the op is bound by the bytes of weight streamed per token.

:func:`w8a16_kernel` (weight-only)
    ``acc += x_tile @ float(w_tile)`` in fp32, with the int8 -> bf16/fp16 conversion done in registers
    (exact: |q| <= 127 fits both formats), and the per-output-channel scale applied once per output
    element in the epilogue instead of once per weight element: ``y = acc * w_scale[n] + bias``. The
    products ``x * q`` are exact in fp32, so the kernel is slightly *more* accurate than the reference,
    which rounds the dequantized weight to the activation dtype first. Decode (M <= 16) uses
    BLOCK_M = 16 and split-K: a decode GEMM has only ``N / BLOCK_N`` output tiles (64 for
    down_proj, N = 4096), too few to keep every SM streaming weights, so K is cut into ``SPLIT_K``
    contiguous chunks that run as separate programs and write fp32 partial sums, reduced in a fixed
    order by a small epilogue kernel (deterministic, unlike atomics).

:func:`w8a8_kernel` (int8 x int8 -> int32, fused dynamic activation quantization)
    The per-token activation quantization runs inside the GEMM rather than as a separate pass that
    writes int8 activations and scales to memory and reads them back: each program first sweeps its
    BLOCK_M rows over the whole of K for their abs-max (after ``smooth_inv``), turns that into the
    fp32 per-row scale exactly as :func:`quantkit.qmath.abs_max_scale` does, then quantizes every
    A tile on the fly in the K loop and multiplies it with the int8 weight tile into an int32
    accumulator (``tl.dot(..., out_dtype=tl.int32)``). The epilogue rescales in fp32:
    ``y = float(acc) * row_scale[m] * w_scale[n] + bias``. With a static ``input_scale`` the sweep
    is skipped. The price of the fusion is that every program along N re-reads and re-quantizes
    the same rows; ``prequantize=True`` runs the same GEMM on activations quantized once by
    :func:`quantize_rows_kernel`, so the two designs can be compared on hardware (see
    eval/bench_kernels.py).

Bit-exactness of the int8 activations: the abs-max is exact, and the two divisions that follow
(``amax / 127`` and ``x / scale``) use ``tl.math.div_rn``, IEEE round-to-nearest like PyTorch's fp32
division (Triton's plain ``/`` on fp32 is not guaranteed to be correctly rounded on NVIDIA GPUs; it
has lowered to ``div.full.f32``, accurate to 2 ulp). The rounding to an integer is round-half-to-even
like ``torch.round`` (see :func:`_round_half_even`). So the int8 activations, and hence the int32
accumulator, equal the reference's; the outputs differ only by the fp32 epilogue (a fused
multiply-add where the reference rounds twice) before the final cast.

All offsets are int32, which the ``supports`` predicates in :mod:`quantkit.kernels.triton_kernels`
guarantee by bounding the tensor sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..qmath import EPS, QMAX

# quantkit.qmath's constants as compile-time values: a @triton.jit function reads only constexpr globals.
_QMAX = tl.constexpr(float(QMAX))
_EPS = tl.constexpr(EPS)


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
    v = tl.minimum(tl.maximum(v, -_QMAX), _QMAX)
    return _round_half_even(v).to(tl.int8)


@triton.jit
def _load_k_cols(ptrs, k, K, EVEN_K: tl.constexpr):
    """A tile laid out [rows, BLOCK_K] (K along columns, offsets ``k``); zero past K unless EVEN_K."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(k < K)[None, :], other=0)
    return tile


@triton.jit
def _load_k_rows(ptrs, k, K, EVEN_K: tl.constexpr):
    """A tile laid out [BLOCK_K, cols] (K along rows, offsets ``k``); zero past K unless EVEN_K."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(k < K)[:, None], other=0)
    return tile


@triton.jit
def _load_act_f32(x_ptrs, k, K, smooth_ptr, HAS_SMOOTH: tl.constexpr, EVEN_K: tl.constexpr):
    """An activation tile in fp32, times ``smooth_inv`` along K when given (zero past K)."""
    a = _load_k_cols(x_ptrs, k, K, EVEN_K).to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + k, mask=k < K, other=0.0)
        a = a * s[None, :]
    return a


@triton.jit
def _abs_max_scale(x_rows, K, smooth_ptr, HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row fp32 scales of the rows at ``x_rows`` ([BLOCK_M, 1] pointers), as quantkit.qmath.abs_max_scale.

    The abs-max runs over the *whole* of K (after ``smooth_inv``), so under split-K every split
    quantizes with the same scale.
    """
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_act_f32(x_rows + k[None, :], k, K, smooth_ptr, HAS_SMOOTH, False)
        amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
    return tl.math.div_rn(tl.maximum(amax, _EPS), _QMAX)


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: ``pid_n``, the row and column offsets, and the rows/columns to load.

    Grouped ordering: GROUP_M row-blocks sweep N together, so the weight tiles they share are still
    in L2 when the next row-block asks for them (matters at prefill, a no-op at decode). Rows/columns
    past the edge load a valid row/column instead (wrapped), so only K needs a mask in the K loop;
    their results are never stored.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, offs_m, offs_n, offs_m % M, offs_n % N


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


@triton.jit
def _store_partial(acc, pid_k, offs_m, offs_n, M, N, part_ptr):
    """Split-K: unscaled partial sums into ``[SPLIT_K, M, N]``; :func:`splitk_epilogue_kernel` finishes."""
    ptrs = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def w8a16_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, M_BUCKET,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BF16_RNE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    _, offs_m, offs_n, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
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
        a = _load_k_cols(x_ptrs, offs_k, K, EVEN_K)
        w = _load_k_rows(w_ptrs, offs_k, K, EVEN_K)
        # The dequantization: int8 -> activation dtype in registers (exact), scale deferred to the
        # epilogue. The weight never exists in memory in any format but int8.
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K
    if SPLIT_K == 1:
        _store_scaled(acc, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BF16_RNE)
    else:
        _store_partial(acc, pid_k, offs_m, offs_n, M, N, out_ptr)  # fp32 partials


@triton.jit
def w8a8_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, smooth_ptr, in_scale_ptr, row_scale_ptr, out_ptr,
    M, N, K, stride_xm, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_SMOOTH: tl.constexpr, STATIC_SCALE: tl.constexpr,
    PREQUANTIZED: tl.constexpr, SPLIT_K: tl.constexpr, BF16_RNE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # x_ptr: float activations, or int8 ones with their scales in row_scale_ptr when PREQUANTIZED.
    # With SPLIT_K > 1, out_ptr is an int32 [SPLIT_K, M, N] partial buffer and (dynamic, fused case)
    # the per-row scales are written to row_scale_ptr for the epilogue kernel.
    pid_n, offs_m, offs_n, rows, cols = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    x_rows = x_ptr + rows[:, None] * stride_xm

    # Per-row activation scale [BLOCK_M], fp32.
    if STATIC_SCALE:
        row_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(in_scale_ptr)
    elif PREQUANTIZED:
        row_scale = tl.load(row_scale_ptr + rows)
    else:
        # Fused prologue: the abs-max sweep over these rows.
        row_scale = _abs_max_scale(x_rows, K, smooth_ptr, HAS_SMOOTH, BLOCK_M, BLOCK_K)
        if SPLIT_K > 1:
            if (pid_n == 0) & (pid_k == 0):
                tl.store(row_scale_ptr + offs_m, row_scale, mask=offs_m < M)

    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, k_tiles):
        if PREQUANTIZED:
            a_q = _load_k_cols(x_rows + offs_k[None, :], offs_k, K, EVEN_K)
        else:
            a = _load_act_f32(x_rows + offs_k[None, :], offs_k, K, smooth_ptr, HAS_SMOOTH, EVEN_K)
            # Padding columns are 0 and quantize to 0, so they add nothing to the accumulator.
            a_q = _quantize_tile(a, row_scale[:, None])
        w = _load_k_rows(w_ptrs, offs_k, K, EVEN_K)
        # int8 x int8 on the tensor cores, exact in int32 (K <= W8A8_MAX_K, checked by supports).
        acc += tl.dot(a_q, w, out_dtype=tl.int32)
        w_ptrs += BLOCK_K
        offs_k += BLOCK_K

    if SPLIT_K == 1:
        # Rescale in fp32, in the reference's order: (acc * row_scale) * w_scale + bias.
        y = acc.to(tl.float32) * row_scale[:, None]
        _store_scaled(y, offs_m, offs_n, M, N, w_scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BF16_RNE)
    else:
        _store_partial(acc, pid_k, offs_m, offs_n, M, N, out_ptr)  # int32 partials


@triton.jit
def splitk_epilogue_kernel(
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
def quantize_rows_kernel(
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
        scale = _abs_max_scale(x_rows, K, smooth_ptr, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    tl.store(scale_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_act_f32(x_rows + k[None, :], k, K, smooth_ptr, HAS_SMOOTH, False)
        q = _quantize_tile(a, scale[:, None])
        tl.store(xq_ptr + offs_m[:, None] * K + k[None, :], q, mask=m_mask[:, None] & (k < K)[None, :])
