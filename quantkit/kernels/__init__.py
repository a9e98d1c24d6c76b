"""The single dispatch point for quantized matmuls.

Quantized modules call :func:`w8a16_linear` and :func:`w8a8_linear` and nothing else. The ops'
signatures and contracts are stated once, by the protocols :class:`W8A16Op` and :class:`W8A8Op`.
Each backend registers an implementation for an op together with the device type it runs on and a
:data:`Supports` predicate that states its shape/dtype constraints. The first registered implementation (in
priority order) whose predicate accepts the call runs; the reference implementation in
:mod:`quantkit.kernels.reference` takes everything else and is also the oracle in tests.

``QUANTKIT_KERNELS=reference`` in the environment, or :func:`force_backend`, pins every call to one
backend, which is how evaluations compare a fast path against the reference.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .registry import (
    OPS,
    Impl,
    Op,
    Supports,
    W8A8Op,
    W8A16Op,
    backends,
    force_backend,
    register,
    select,
)

__all__ = [
    "OPS",
    "Impl",
    "Op",
    "Supports",
    "W8A8Op",
    "W8A16Op",
    "backends",
    "force_backend",
    "register",
    "select",
    "w8a8_linear",
    "w8a16_linear",
]

log = logging.getLogger(__name__)


def w8a16_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with int8 weights; contract: :class:`W8A16Op`."""
    return select("w8a16", x, weight)[1](x, weight, weight_scale, bias)


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 activations x int8 weights -> int32 -> rescaled output; contract: :class:`W8A8Op`."""
    return select("w8a8", x, weight)[1](x, weight, weight_scale, bias, smooth_inv, input_scale)


def _load_backends() -> None:
    from . import cpu

    cpu.register_all(register)
    if torch.cuda.is_available():
        from . import cuda

        cuda.register_all(register)
        # Triton is optional on CUDA machines; probe for it rather than swallowing import errors.
        if importlib.util.find_spec("triton") is not None:
            from . import triton_kernels

            triton_kernels.register_all(register)
        else:
            log.info("triton is not installed: CUDA int8 ops use torch._int_mm and the reference path")


_load_backends()
