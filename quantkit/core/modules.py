"""Quantized modules and the registry of float layers they replace.

A quantized linear module holds int8 ``weight`` ``[out, in]``, fp32 per-output-channel
``weight_scale`` ``[out]`` and an optional ``bias``; its ``forward`` is one call into
:mod:`quantkit.kernels`. :class:`Int8Embedding` holds an embedding table the same way (one scale
per row), so a tied ``lm_head`` can share its buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .. import kernels
from ..qmath import quantize_row_blocks, quantize_weight_per_channel


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


def embeddings_of(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """``(input embedding, output projection)`` of a transformers model; None where it has none."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return inp, out


def tied_output_weight(model: nn.Module) -> str | None:
    """The name of the output projection's weight where the config ties it to the input embedding
    (a checkpoint stores it once, under the embedding; a skeleton built from the config may not be
    tied yet), else None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = embeddings_of(model)[1]
    if not getattr(config, "tie_word_embeddings", False) or head is None or not hasattr(head, "weight"):
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (fully qualified)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The float layer's weight as an ``[out, in]`` view (no copy)."""
    w = module.weight
    return w.T if FLOAT_LINEARS[type(module).__name__].transposed else w


# The fp32 buffers of quantized modules, by the names a checkpoint stores them under
# (``<module>.<name>``, beside the int8 ``weight`` and an optional ``bias`` in the model dtype). They
# stay fp32 whatever the model's dtype: see _Int8Module.
SCALE_BUFFERS = ("weight_scale", "smooth_inv", "input_scale")


class _Int8Module(nn.Module):
    """Keeps the fp32 scale buffers fp32 through ``module.to(dtype)``/``.half()``.

    Casting a quantized model to its serving dtype must not round the scales the int8 values were
    computed against (a bf16 scale has 8 bits of mantissa). Devices still follow ``.to(device)``.
    """

    def _apply(self, fn, recurse: bool = True):
        kept = {n: b for n in SCALE_BUFFERS if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, b in kept.items():
            moved = self._buffers[n]
            self._buffers[n] = moved if moved.dtype == torch.float32 else b.to(moved.device)
        return self


class _QuantLinearBase(_Int8Module):
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
        # Buffers declared on the meta device and then assigned: no second, empty copy of the weight.
        q = cls(in_features, out_features, bias is not None, weight.dtype, device="meta", **kwargs)
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

    @classmethod
    def from_rows(
        cls,
        shape: tuple[int, int],
        rows: Callable[[int, int], torch.Tensor],
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> W8A16Linear:
        """Quantize an ``[out, in]`` weight given a block of rows at a time (:func:`quantize_row_blocks`):
        the float weight is never whole in memory, e.g. a large ``lm_head`` read from a checkpoint."""
        q = cls(shape[1], shape[0], bias is not None, dtype, device="meta")
        q.weight, q.weight_scale = quantize_row_blocks(shape, rows)
        if bias is not None:
            q.bias = bias
        return q

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


# Float embedding types Int8Embedding replaces, by class name (exact classes, as for linears), and
# whether the class multiplies its output by ``embed_scale`` (Gemma's scaled embeddings: checked to
# return ``embedding(ids) * embed_scale.to(weight.dtype)`` with ``scalar_embed_scale`` = its value).
FLOAT_EMBEDDINGS: dict[str, bool] = {
    "Embedding": False,
    "GemmaTextScaledWordEmbedding": True,
    "Gemma2TextScaledWordEmbedding": True,
    "Gemma3TextScaledWordEmbedding": True,
}


def is_float_embedding(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Embedding)
        and type(module).__name__ in FLOAT_EMBEDDINGS
        and module.max_norm is None  # max_norm renormalizes rows in place on lookup
    )


class Int8Embedding(_Int8Module):
    """An embedding table stored int8 with one fp32 scale per row; lookups dequantize what they gather.

    ``weight`` int8 ``[num_embeddings, embedding_dim]``, ``weight_scale`` fp32 ``[num_embeddings]``:
    row ``i`` is ``weight[i] * weight_scale[i]``, the same per-output-channel layout as
    :class:`W8A16Linear`, so a tied ``lm_head`` shares both buffers. The output is in ``out_dtype``,
    the model's float dtype, which follows ``module.to(dtype)``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: torch.dtype,
        device=None,
        *,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))
        # Gemma's scaled embeddings: not saved (as in their float class), rebuilt from the scalar.
        # Kept off the meta device, since no checkpoint fills it.
        self.scalar_embed_scale = embed_scale
        real = "cpu" if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("embed_scale", None, persistent=False)
        self.reset_embed_scale(real)

    @classmethod
    def like(cls, module: nn.Embedding, dtype: torch.dtype | None = None, device=None) -> Int8Embedding:
        """An empty int8 table with the geometry of the float embedding ``module`` (by default in its
        dtype and on its device); loading fills it, :meth:`from_float` quantizes into it."""
        scaled = FLOAT_EMBEDDINGS[type(module).__name__]
        return cls(
            module.num_embeddings,
            module.embedding_dim,
            dtype or module.weight.dtype,
            device=module.weight.device if device is None else device,
            padding_idx=module.padding_idx,
            embed_scale=module.scalar_embed_scale if scaled else None,
        )

    @classmethod
    def from_float(cls, module: nn.Embedding) -> Int8Embedding:
        q = cls.like(module, device="meta")  # then assigned: no second, empty copy of the table
        q.weight, q.weight_scale = quantize_weight_per_channel(module.weight)
        q.reset_embed_scale(module.weight.device)
        return q

    def reset_embed_scale(self, device=None) -> None:
        """(Re)build the ``embed_scale`` buffer, e.g. after a loader replaced it with uninitialized memory."""
        if self.scalar_embed_scale is not None:
            device = device or self.weight.device
            self.embed_scale = torch.tensor(float(self.scalar_embed_scale), device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).float() * self.weight_scale[input_ids].unsqueeze(-1)
        out = rows.to(self.out_dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.out_dtype)
        return out

    def _apply(self, fn, recurse: bool = True):
        # Track .to(dtype)/.half(): ``fn`` casts float tensors and leaves the int8 table alone.
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, out_dtype={self.out_dtype}"


class Int8TiedHead(nn.Module):
    """The output projection (``lm_head``) of a model that ties it to its input embedding.

    Computes ``x @ (table * scale).T`` weight-only (as :class:`W8A16Linear`) straight from the
    :class:`Int8Embedding`'s buffers, which it reads through a plain reference rather than owning:
    the table exists once in memory and on disk, stays shared through ``.to(device)``, and the
    head's state dict holds at most its ``bias``.
    """

    def __init__(self, embedding: Int8Embedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        # Not a submodule (that would list the table twice in the state dict): a plain reference.
        object.__setattr__(self, "embedding", embedding)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.embedding.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a16_linear(x, self.embedding.weight, self.embedding.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the int8 embedding"
