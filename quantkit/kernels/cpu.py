"""CPU fast paths built on PyTorch's integer kernels.

- W8A8: ``torch._int_mm`` multiplies int8 by int8 into int32 with the CPU's integer dot-product
  instructions (AVX512-VNNI / AVX-VNNI where present).
- W8A16: ``torch._weight_int8pack_mm`` multiplies float activations by int8 weights, converting the
  weight in registers, so no float copy of the weight is written to memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import Impl
from .reference import quantize_activations

# Above this many rows, _weight_int8pack_mm (a matrix-vector style kernel) loses to converting the
# weight once and calling the float GEMM: the conversion is amortized over M rows. Measured on a
# 2-core AVX512 machine for 576x1536: M=1 32 us vs 100 us bf16; M=512 6.2 ms vs 2.2 ms bf16.
W8A16_PACKED_MAX_ROWS = 32


def w8a8_linear(x, weight, weight_scale, bias=None, smooth_inv=None, input_scale=None):
    x2d = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_activations(x2d, smooth_inv, input_scale)
    acc = torch._int_mm(xq, weight.T)
    # int32 accumulator rescaled in fp32 (see reference.w8a8_linear).
    y = acc.float() * x_scale * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def w8a8_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dim() >= 1 and weight.dtype == torch.int8


def w8a16_linear(x, weight, weight_scale, bias=None):
    x2d = x.reshape(-1, x.shape[-1])
    y = torch._weight_int8pack_mm(x2d.contiguous(), weight, weight_scale.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def w8a16_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > W8A16_PACKED_MAX_ROWS or weight.dtype != torch.int8:
        return False
    if x.dtype in (torch.float32, torch.float16):
        return True
    # The bf16 kernel in torch 2.13 returns garbage (or crashes) unless K is a multiple of 16:
    # probed K in {7, 8, 24, 33} -> NaN/garbage/segfault, every multiple of 16 tried -> correct.
    return x.dtype == torch.bfloat16 and weight.shape[1] % 16 == 0


def register_all(register: Callable[[str, Impl], None]) -> None:
    register("w8a8", Impl("cpu_int_mm", "cpu", w8a8_linear, w8a8_supports, priority=10))
    register("w8a16", Impl("cpu_int8pack", "cpu", w8a16_linear, w8a16_supports, priority=10))
