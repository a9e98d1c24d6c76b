"""The single dispatch point for quantized matmuls.

Quantized modules call :func:`w8a16_linear` and :func:`w8a8_linear` and nothing else. Each backend
registers an implementation for an op together with the device type it runs on and a ``supports``
predicate that states its shape/dtype constraints. The first registered implementation (in
priority order) whose predicate accepts the call runs; the reference implementation in
:mod:`quantkit.kernels.reference` takes everything else and is also the oracle in tests.

``QUANTKIT_KERNELS=reference`` in the environment, or :func:`force_backend`, pins every call to one
backend, which is how evaluations compare a fast path against the reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import reference

log = logging.getLogger(__name__)

OPS = ("w8a16", "w8a8")


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    backend: str
    device_type: str
    fn: Callable[..., torch.Tensor]
    # supports(x, weight) -> bool; x is the activation as passed to the op, weight the int8 [N, K].
    supports: Callable[[torch.Tensor, torch.Tensor], bool]
    priority: int = 0


_IMPLS: dict[str, list[Impl]] = {op: [] for op in OPS}
_REFERENCE = {"w8a16": reference.w8a16_linear, "w8a8": reference.w8a8_linear}
_forced: str | None = None


def register(op: str, impl: Impl) -> None:
    """Add an implementation; higher ``priority`` is tried first."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    _IMPLS[op].append(impl)
    _IMPLS[op].sort(key=lambda i: -i.priority)


def backends() -> dict[str, list[str]]:
    """Registered backends per op, in the order they are tried."""
    return {op: [f"{i.backend}({i.device_type})" for i in impls] + ["reference"] for op, impls in _IMPLS.items()}


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run every quantized op through backend ``name`` (e.g. ``"reference"``) inside the block."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _pinned() -> str | None:
    return _forced or os.environ.get("QUANTKIT_KERNELS") or None


def select(op: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[str, Callable[..., torch.Tensor]]:
    """The backend name and function that will run ``op`` for these operands."""
    pinned = _pinned()
    if pinned == "reference":
        return "reference", _REFERENCE[op]
    for impl in _IMPLS[op]:
        if pinned is not None and impl.backend != pinned:
            continue
        if impl.device_type == x.device.type and impl.supports(x, weight):
            return impl.backend, impl.fn
    return "reference", _REFERENCE[op]


def w8a16_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` with int8 weights; see :mod:`quantkit.kernels.reference`."""
    return select("w8a16", x, weight)[1](x, weight, weight_scale, bias)


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 activations x int8 weights -> int32 -> rescaled output; see :mod:`quantkit.kernels.reference`."""
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
