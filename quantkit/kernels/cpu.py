"""CPU fast paths built on PyTorch's integer kernels.

Two tiers, both chosen through :func:`quantkit.kernels.select`:

- :mod:`quantkit.kernels.cpu_fused` (tried first): one C++ call per linear, with activation
  quantization and the rescale fused around the integer matmul. Built on first use; switched off
  with ``QUANTKIT_COMPILE=0`` or where no compiler is found.
- The eager paths below (the fallback), in as few PyTorch ops as the arithmetic allows:

  - W8A8: ``torch._int_mm`` multiplies int8 by int8 into int32 with the CPU's integer dot-product
    instructions (AVX512-VNNI / AVX-VNNI where present).
  - W8A16: ``torch._weight_int8pack_mm`` multiplies float activations by int8 weights, converting
    the weight in registers, so no float copy of the weight is written to memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..qmath import EPS, QMAX
from . import cpu_fused
from .reference import rows_per_sequence
from .registry import Impl

# Above this many rows per sequence, _weight_int8pack_mm (a matrix-vector style kernel) loses to converting the
# weight once and calling the float GEMM: the conversion is amortized over M rows. Measured on a
# 2-core AVX512 machine for 576x1536: M=1 32 us vs 100 us bf16; M=512 6.2 ms vs 2.2 ms bf16.
W8A16_PACKED_MAX_ROWS = 32


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 in eager PyTorch, equal to :func:`quantkit.kernels.reference.w8a8_linear`.

    Same arithmetic as the reference with fewer ops: the abs-max of bf16/fp16 values is exact in
    their own dtype, ``x / scale`` promotes to fp32 by itself, and ``int32 * fp32`` promotes the
    accumulator without a separate cast.
    """
    x2d = x.reshape(-1, x.shape[-1])
    if smooth_inv is not None:
        x2d = x2d.float() * smooth_inv.float()
    if input_scale is None:
        scale = x2d.abs().amax(dim=-1, keepdim=True).float().clamp_min_(EPS).div_(QMAX)
    else:
        scale = input_scale.float().reshape(1, 1)
    xq = torch.round(x2d / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    # int32 accumulator rescaled in fp32, in the reference's order (see reference.w8a8_linear).
    y = (torch._int_mm(xq, weight.T) * scale).mul_(weight_scale.float())
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def w8a8_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # torch 2.13's CPU _int_mm returns wrong sums for K = 1 (probed at every M): tiny K goes to the reference.
    return x.dim() >= 1 and weight.dtype == torch.int8 and weight.shape[-1] >= 2


def w8a16_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 through ``torch._weight_int8pack_mm``; close to the reference (the scale is applied in ``x.dtype``)."""
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous() or x2d.data_ptr() % cpu_fused.ALIGN:
        x2d = x2d.clone(memory_format=torch.contiguous_format)  # fresh memory is aligned (see ALIGN)
    y = torch._weight_int8pack_mm(x2d, weight, weight_scale.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def w8a16_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Chosen by tokens per sequence, not rows in the batch: the packed kernel and the float GEMM
    # round differently, so the choice must not depend on the batch (see rows_per_sequence).
    rows = rows_per_sequence(x) if x.dim() >= 1 and x.numel() else 0
    if rows == 0 or rows > W8A16_PACKED_MAX_ROWS or weight.dtype != torch.int8 or x.dtype not in cpu_fused.FLOAT_DTYPES:
        return False
    # The kernel reads weights with aligned loads: a misaligned one segfaults (see cpu_fused.ALIGN).
    if not weight.is_contiguous() or weight.data_ptr() % cpu_fused.ALIGN:
        return False
    # The bf16 kernel in torch 2.13 returns garbage (or crashes) unless K is a multiple of 16:
    # probed K in {7, 8, 24, 33} -> NaN/garbage/segfault, every multiple of 16 tried -> correct.
    return x.dtype != torch.bfloat16 or weight.shape[1] % 16 == 0


def register_all(register: Callable[[str, Impl], None]) -> None:
    cpu_fused.register_all(register)
    register("w8a8", Impl("cpu_int_mm", "cpu", w8a8_linear, w8a8_supports, priority=10))
    register("w8a16", Impl("cpu_int8pack", "cpu", w8a16_linear, w8a16_supports, priority=10))
