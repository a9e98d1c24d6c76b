"""Quantized linear modules and the registry of float layers they replace.

A quantized module holds int8 ``weight`` ``[out, in]``, fp32 per-output-channel ``weight_scale``
``[out]`` and an optional ``bias``; its ``forward`` is one call into :mod:`quantkit.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import kernels
from .tensor import quantize_weight_per_channel


@dataclass(frozen=True)
class FloatLinearKind:
    """How a float layer type stores its weight."""

    # True when the weight is stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in].
    transposed: bool


# Float layer types that quantkit quantizes, by class name. Exact classes only: a subclass may
# change forward(), so subclasses are listed once checked to compute x @ W.T + b.
FLOAT_LINEARS: dict[str, FloatLinearKind] = {
    "Linear": FloatLinearKind(transposed=False),
    "Conv1D": FloatLinearKind(transposed=True),  # GPT-2 family
    "FalconLinear": FloatLinearKind(transposed=False),  # nn.Linear with a hand-written forward
}


def is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and type(module).__name__ in FLOAT_LINEARS


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The float layer's weight as an ``[out, in]`` view (no copy)."""
    w = module.weight
    return w.T if FLOAT_LINEARS[type(module).__name__].transposed else w


class _QuantLinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def _from_weight(cls, module: nn.Module, weight: torch.Tensor, **kwargs) -> _QuantLinearBase:
        out_features, in_features = weight.shape
        bias = getattr(module, "bias", None)
        q = cls(in_features, out_features, bias is not None, weight.dtype, device=weight.device, **kwargs)
        q.weight, q.weight_scale = quantize_weight_per_channel(weight)
        if bias is not None:
            q.bias = bias.detach().clone()
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class W8A16Linear(_QuantLinearBase):
    """INT8 weights, activations in the model dtype (weight-only quantization)."""

    @classmethod
    def from_float(cls, module: nn.Module, weight: torch.Tensor | None = None) -> W8A16Linear:
        """Quantize a float layer. ``weight`` overrides its ``[out, in]`` weight (e.g. after smoothing)."""
        return cls._from_weight(module, weight_out_in(module) if weight is None else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a16_linear(x, self.weight, self.weight_scale, self.bias)


class W8A8Linear(_QuantLinearBase):
    """INT8 weights and INT8 activations, int32 accumulation.

    Buffers beyond the base: ``smooth_inv`` ``[in]`` (fp32), the run-time SmoothQuant pre-scale for
    layers with no norm to fold it into; ``input_scale`` (fp32 scalar), the static per-tensor
    activation scale. Either is None when unused: dynamic per-token scales, no pre-scale.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device=None,
        *,
        has_smooth: bool = False,
        static: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer(
            "smooth_inv", torch.empty(in_features, dtype=torch.float32, device=device) if has_smooth else None
        )
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, device=device) if static else None)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: torch.Tensor | None = None,
        smooth_inv: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> W8A8Linear:
        """Quantize a float layer; ``weight`` (``[out, in]``) must already include any smoothing."""
        q = cls._from_weight(
            module,
            weight_out_in(module) if weight is None else weight,
            has_smooth=smooth_inv is not None,
            static=input_scale is not None,
        )
        if smooth_inv is not None:
            q.smooth_inv = smooth_inv.detach().float().clone()
        if input_scale is not None:
            q.input_scale = input_scale.detach().float().reshape(()).clone()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a8_linear(x, self.weight, self.weight_scale, self.bias, self.smooth_inv, self.input_scale)

    def extra_repr(self) -> str:
        act = "static per-tensor" if self.input_scale is not None else "dynamic per-token"
        return f"{super().extra_repr()}, activations={act}, pre_scale={self.smooth_inv is not None}"


QUANT_MODULES: dict[str, type[_QuantLinearBase]] = {"w8a16": W8A16Linear, "w8a8": W8A8Linear}


def make_empty(scheme: str, in_features: int, out_features: int, bias: bool, dtype, device=None, **kw):
    """An uninitialized quantized module with the buffers a checkpoint will fill (used on load)."""
    return QUANT_MODULES[scheme](in_features, out_features, bias, dtype, device, **kw)
