"""CUDA paths that need no compiler: cuBLAS int8 GEMM through ``torch._int_mm``.

These sit below the Triton kernels in priority and above the reference, for shapes the Triton
kernels do not take or machines without Triton.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu import w8a8_linear as _int_mm_w8a8
from .registry import Impl


def w8a8_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # cuBLAS int8 GEMM constraints as enforced by torch._int_mm on CUDA: M > 16, K and N multiples of 8.
    rows = x.numel() // max(x.shape[-1], 1)
    n, k = weight.shape
    return rows > 16 and k % 8 == 0 and n % 8 == 0


def register_all(register: Callable[[str, Impl], None]) -> None:
    register("w8a8", Impl("cuda_int_mm", "cuda", _int_mm_w8a8, w8a8_supports, priority=5))
