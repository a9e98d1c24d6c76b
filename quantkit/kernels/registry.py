"""The registry behind :mod:`quantkit.kernels`: the ops' signatures, the backends' implementations,
and the choice among them.

Backends import :class:`Impl` from here (not from the package, whose ``__init__`` imports them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch

from . import reference

OPS = ("w8a16", "w8a8")


class W8A16Op(Protocol):
    """The ``w8a16`` op (weight-only INT8), as every backend implements it.

    ``x`` float ``[..., K]`` (bf16/fp16/fp32), ``weight`` int8 ``[N, K]``, ``weight_scale`` fp32 ``[N]``,
    ``bias`` ``[N]`` or None. Returns ``x @ (weight * weight_scale[:, None]).T + bias`` in ``x.dtype``,
    shape ``[..., N]``.
    """

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class W8A8Op(Protocol):
    """The ``w8a8`` op (SmoothQuant: int8 activations x int8 weights), as every backend implements it.

    Same shapes as :class:`W8A16Op`, plus ``smooth_inv`` fp32 ``[K]`` or None (a per-input-channel
    multiplier applied to ``x`` before quantization: the SmoothQuant pre-scale for layers with no
    norm to fold it into) and ``input_scale`` fp32 scalar tensor or None (static per-tensor
    activation scale; None means dynamic per-token scales, :func:`quantkit.qmath.quantize_per_token`).
    Activations are quantized to int8 (:func:`quantkit.qmath.quantize_to_int8`), multiplied with the
    int8 weights into int32, and rescaled in fp32:
    ``y = (xq @ wq.T) * x_scale[:, None] * weight_scale[None, :] + bias``, returned in ``x.dtype``.
    """

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        smooth_inv: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


Op: TypeAlias = W8A16Op | W8A8Op
# supports(x, weight) -> bool; x is the activation as passed to the op, weight the int8 [N, K].
Supports: TypeAlias = Callable[[torch.Tensor, torch.Tensor], bool]


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op: ``fn`` runs it where ``supports`` accepts the operands."""

    backend: str
    device_type: str
    fn: Op
    supports: Supports
    priority: int = 0


_IMPLS: dict[str, list[Impl]] = {op: [] for op in OPS}
_REFERENCE: dict[str, Op] = {"w8a16": reference.w8a16_linear, "w8a8": reference.w8a8_linear}
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


def select(op: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[str, Op]:
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
