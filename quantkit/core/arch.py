"""Architecture knowledge, as data: which norm feeds which linear layers.

SmoothQuant divides a norm's output channels by ``s`` and multiplies the input columns of every
linear layer that reads that output by ``s``; the float model computes the same function. That
is only valid when the norm's output goes *only* into those linears, so the mapping is per
architecture. Each entry lists alternative layer layouts; the first layout whose config condition
holds and whose modules all exist under a module is applied there (that module is a decoder layer).

Linears that no group covers (``o_proj``, ``down_proj``, ...) and architectures absent from this
table are still quantized; with ``fallback_smoothing`` they get a run-time per-channel pre-scale.

Each entry also lists its :class:`Producer` pairs: layers whose input is linear in each output row
of an earlier layer, where the compressed-tensors export moves that run-time pre-scale instead
(see :mod:`quantkit.formats.compressed_tensors`). Names are relative to the decoder layer.

:func:`smooth_groups` and :func:`producer_pairs` resolve the table against a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn


@dataclass(frozen=True)
class SmoothGroup:
    """A norm and the linear layers that read its output."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    groups: tuple[SmoothGroup, ...]
    # Config attributes that must have these values for the layout to be valid.
    requires: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Producer:
    """``consumer``'s input channels are ``producer``'s last output rows, through a function that is
    linear in each of those rows (a gate product, ReLU or attention).

    ``heads``: the consumer reads ``num_attention_heads`` heads built from ``num_key_value_heads``
    value heads (attention: value rows -> output projection); otherwise channel ``j`` of the
    consumer is row ``j`` of the producer's last ``in_features`` rows.
    """

    producer: str
    consumer: str
    heads: bool = False
    # Config attributes that must have these values (e.g. OPT's MLP only for ReLU).
    requires: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArchSpec:
    layouts: tuple[Layout, ...]
    # Pairs where a consumer's smoothing can move into its producer (compressed-tensors export).
    # None here: GPT-2 and Falcon (GELU MLPs; fused, interleaved qkv) and unknown architectures.
    producers: tuple[Producer, ...] = ()
    # The norm computes x_hat * (offset + weight): Gemma stores weight - 1, so its offset is 1.
    norm_offset: float = 0.0
    # Extra module patterns never quantized for this architecture (e.g. a vision tower).
    exclude: tuple[str, ...] = ()


def _g(norm: str, *linears: str) -> SmoothGroup:
    return SmoothGroup(norm, linears)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Gated MLP and attention: up rows feed down_proj, value rows feed o_proj.
_GATED = (Producer("self_attn.v_proj", "self_attn.o_proj", heads=True), Producer("mlp.up_proj", "mlp.down_proj"))

# Llama-style pre-norm decoder: attention and MLP each read their own RMSNorm.
_LLAMA = ArchSpec(
    (Layout((_g("input_layernorm", *_QKV), _g("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"))),),
    producers=_GATED,
)

# Gemma 2/3 put an extra norm after attention (post_attention_layernorm feeds the residual, not the
# MLP); the MLP reads pre_feedforward_layernorm.
_GEMMA2 = ArchSpec(
    (Layout((_g("input_layernorm", *_QKV), _g("pre_feedforward_layernorm", "mlp.gate_proj", "mlp.up_proj"))),),
    producers=_GATED,
    norm_offset=1.0,
    exclude=("vision_tower*", "multi_modal_projector*"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Qwen3's q_norm/k_norm act on the projections' outputs, so its inputs smooth like Llama's.
    "qwen3": _LLAMA,
    "gemma": ArchSpec(_LLAMA.layouts, _GATED, norm_offset=1.0),
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # Phi-3 fuses q/k/v and gate/up into single linears: the value rows are the last rows of
    # qkv_proj, the up rows the last half of gate_up_proj.
    "phi3": ArchSpec(
        (
            Layout(
                (
                    _g("input_layernorm", "self_attn.qkv_proj"),
                    _g("post_attention_layernorm", "mlp.gate_up_proj"),
                )
            ),
        ),
        producers=(
            Producer("self_attn.qkv_proj", "self_attn.o_proj", heads=True),
            Producer("mlp.gate_up_proj", "mlp.down_proj"),
        ),
    ),
    # OPT: only the pre-norm variants (do_layer_norm_before=True; all but opt-350m) can be smoothed.
    "opt": ArchSpec(
        (
            Layout(
                (_g("self_attn_layer_norm", *_QKV), _g("final_layer_norm", "fc1")),
                requires={"do_layer_norm_before": True},
            ),
        ),
        producers=(
            Producer("self_attn.v_proj", "self_attn.out_proj", heads=True),
            # relu(x / s) = relu(x) / s for s > 0: only ReLU MLPs.
            Producer("fc1", "fc2", requires={"activation_function": "relu"}),
        ),
    ),
    # GPT-2 uses Conv1D (weight stored [in, out]); c_attn is the fused q/k/v projection.
    "gpt2": ArchSpec((Layout((_g("ln_1", "attn.c_attn"), _g("ln_2", "mlp.c_fc"))),)),
    # Falcon has three layouts: sequential (two norms), parallel with one shared norm feeding both
    # attention and MLP (falcon-7b), and the new decoder architecture with two parallel norms (40b/180b).
    "falcon": ArchSpec(
        (
            Layout(
                (
                    _g("input_layernorm", "self_attention.query_key_value"),
                    _g("post_attention_layernorm", "mlp.dense_h_to_4h"),
                ),
                requires={"parallel_attn": False},
            ),
            Layout((_g("ln_attn", "self_attention.query_key_value"), _g("ln_mlp", "mlp.dense_h_to_4h"))),
            Layout(
                (_g("input_layernorm", "self_attention.query_key_value", "mlp.dense_h_to_4h"),),
                requires={"parallel_attn": True},
            ),
        )
    ),
}

# Unknown architectures: no norm folding, every linear gets the fallback.
DEFAULT = ArchSpec(())

_E = TypeVar("_E", Layout, Producer)


def spec_of(model: nn.Module) -> ArchSpec:
    """The table entry for the model's ``config.model_type``, or :data:`DEFAULT`."""
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""), DEFAULT)


def requires_hold(requires: dict[str, Any], config: Any) -> bool:
    """Whether ``config`` has every attribute value a :class:`Layout` or :class:`Producer` requires."""
    return all(getattr(config, key, None) == value for key, value in requires.items())


def smooth_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(norm, linears)`` by fully-qualified name, for every group of the first layout that applies
    under each decoder layer of ``model``, in module order."""
    spec = spec_of(model)
    return [
        (f"{prefix}.{g.norm}", [f"{prefix}.{lin}" for lin in g.linears])
        for prefix, layout in _per_layer(model, spec.layouts, first=True)
        for g in layout.groups
    ]


def producer_pairs(model: nn.Module) -> list[tuple[Producer, str, str]]:
    """``(pair, producer, consumer)``, names fully qualified, for every :class:`Producer` pair whose
    config condition holds and whose two modules exist under a decoder layer of ``model``."""
    spec = spec_of(model)
    return [
        (p, f"{prefix}.{p.producer}", f"{prefix}.{p.consumer}")
        for prefix, p in _per_layer(model, spec.producers, first=False)
    ]


def _per_layer(model: nn.Module, entries: tuple[_E, ...], *, first: bool) -> list[tuple[str, _E]]:
    """``(prefix, entry)`` for every module ``prefix`` of ``model`` and every entry (a :class:`Layout` or a
    :class:`Producer`) whose config condition holds and whose modules all exist under ``prefix``; with
    ``first``, only the first such entry per prefix."""
    modules = dict(model.named_modules())
    entries = tuple(e for e in entries if requires_hold(e.requires, model.config))
    found = []
    for prefix in modules:
        for entry in entries:
            if all(f"{prefix}.{name}" in modules for name in _module_names(entry)):
                found.append((prefix, entry))
                if first:
                    break
    return found


def _module_names(entry: Layout | Producer) -> list[str]:
    """The modules, relative to a decoder layer, that ``entry`` needs."""
    if isinstance(entry, Producer):
        return [entry.producer, entry.consumer]
    return [name for g in entry.groups for name in (g.norm, *g.linears)]
