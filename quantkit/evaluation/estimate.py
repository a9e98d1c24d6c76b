"""``quantkit estimate MODEL``: what a model costs, from its config alone, before anything is quantized.

The model is built from its ``config.json`` on the meta device (shapes, no memory, no weights read),
and everything is counted on that skeleton with quantkit's own decisions, so the figures hold for any
architecture transformers builds:

- **parameters** by kind, as ``model.parameters()`` counts them (a tied table once);
- **weight bytes** of the checkpoint in fp32 and bf16, and as quantkit writes W8A16 and W8A8 (default
  :class:`~quantkit.QuantConfig` of each scheme): the layers :func:`~quantkit.select_targets` picks,
  the SmoothQuant run-time pre-scales :func:`~quantkit.core.smoothquant.smoothing_groups` leaves, the
  embedding tables :func:`~quantkit.core.quantize.plan_embeddings` converts, swapped in as the empty
  modules :func:`quantkit.load` builds (:func:`~quantkit.formats.native.swap_in_empty_modules`); the
  bytes are those of the tensors a checkpoint holds (its safetensors headers add a few KB);
- **KV cache** per token and at a context, from the cache the model fills in one forward of a few
  tokens on the meta device (so grouped-query, multi-query and sliding-window layers are as
  transformers runs them);
- **decode FLOPs** per token: ``2 x`` the weights of every matmul (``lm_head`` included, tied or not)
  plus attention over the context, ``2 x heads x (key dim + value dim) x context`` per layer;
- the **bandwidth-bound decode ceiling**: a decode step reads every weight once, but the embedding
  tables it only looks rows up in (the input embedding unless ``lm_head`` multiplies by it, position
  tables), and every sequence's KV cache, so
  ``tokens/s <= batch x bandwidth / (weight bytes + batch x KV bytes at the context)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    DEFAULT_BANDWIDTH_GB_S,
    DEFAULT_ESTIMATE_CONTEXT,
    FLOAT_DTYPES,
    SCHEMES,
    QuantConfig,
)
from ..core.modules import embeddings_of
from ..errors import QuantkitError
from .estimate_model import (
    DECODE_VARIANTS,
    EXPERT_FIELDS,
    PARAM_KINDS,
    VARIANTS,
    KVLayer,
    build_skeleton,
    count_parameters,
    dtype_bytes,
    kv_layers,
    matmul_params,
    quantized_skeleton,
    read_config,
    tensor_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class Estimate:
    """Everything ``quantkit estimate`` reports; :meth:`to_dict` is its JSON."""

    model: str
    model_type: str
    architecture: str
    shape: dict[str, Any]
    parameters: dict[str, int]
    matmul_params: int
    weight_bytes: dict[str, int]  # by variant: every tensor of the checkpoint
    lookup_bytes: dict[str, int]  # by variant: embedding tables a decode step reads one row of
    quantization: dict[str, Any]
    kv_layers: list[KVLayer]
    kv_dtype: str
    context: int
    batch: int
    bandwidth_gb_s: float
    attention_heads: int
    notes: list[str] = field(default_factory=list)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of context in every layer (sliding windows not applied)."""
        return sum(layer.elements_per_token for layer in self.kv_layers) * dtype_bytes(self.kv_dtype)

    @property
    def kv_bytes_per_sequence(self) -> int:
        """KV-cache bytes of one sequence at :attr:`context` (sliding-window layers hold their window)."""
        size = dtype_bytes(self.kv_dtype)
        return sum(layer.elements_per_token * layer.tokens_held(self.context) for layer in self.kv_layers) * size

    @property
    def attention_flops_per_token(self) -> int:
        """Scores and weighted sum of one new token over the context: ``q k^T`` and ``p v`` in every layer."""
        return sum(
            2 * self.attention_heads * (layer.key_dim + layer.value_dim) * layer.tokens_held(self.context)
            for layer in self.kv_layers
        )

    @property
    def flops_per_token(self) -> int:
        return 2 * self.matmul_params + self.attention_flops_per_token

    def decode_ceiling(self, variant: str) -> dict[str, float]:
        """Bytes one decode step reads and the tokens/s that memory bandwidth allows at most."""
        weights = self.weight_bytes[variant] - self.lookup_bytes[variant]
        kv = self.batch * self.kv_bytes_per_sequence
        steps = self.bandwidth_gb_s * 1e9 / (weights + kv)
        return {
            "weight_bytes_read": weights,
            "kv_bytes_read": kv,
            "steps_per_s": steps,
            "tokens_per_s": steps * self.batch,
        }

    def to_dict(self) -> dict[str, Any]:
        bf16 = self.weight_bytes["bf16"]
        return {
            "model": self.model,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "shape": self.shape,
            "parameters": {**self.parameters, "total": sum(self.parameters.values())},
            "weights": {v: {"bytes": self.weight_bytes[v], "vs_bf16": self.weight_bytes[v] / bf16} for v in VARIANTS},
            "quantization": self.quantization,
            "kv_cache": {
                "dtype": self.kv_dtype,
                "bytes_per_token": self.kv_bytes_per_token,
                "context": self.context,
                "batch": self.batch,
                "bytes_per_sequence": self.kv_bytes_per_sequence,
                "bytes": self.batch * self.kv_bytes_per_sequence,
                "layers": len(self.kv_layers),
                "sliding_window_layers": sum(1 for layer in self.kv_layers if layer.window),
            },
            "decode": {
                "context": self.context,
                "batch": self.batch,
                "matmul_params": self.matmul_params,
                "attention_flops_per_token": self.attention_flops_per_token,
                "flops_per_token": self.flops_per_token,
                "bandwidth_gb_s": self.bandwidth_gb_s,
                "ceiling": {v: self.decode_ceiling(v) for v in DECODE_VARIANTS},
            },
            "notes": self.notes,
        }


def estimate(
    model: str | Path,
    *,
    context: int | None = None,
    batch: int = 1,
    bandwidth_gb_s: float = DEFAULT_BANDWIDTH_GB_S,
    kv_dtype: str = "bfloat16",
    embeddings: str = QuantConfig().embeddings,
    progress: bool = True,
) -> Estimate:
    """Parameters, checkpoint bytes, KV cache, decode FLOPs and the bandwidth-bound decode ceiling of
    ``model``, from its config alone.

    Args:
        model: a local model folder, its ``config.json`` (any file name), or ``"smollm2-135m"``.
        context: tokens of context for the KV cache and attention; default
            :data:`~quantkit.config.DEFAULT_ESTIMATE_CONTEXT`, or the model's
            ``max_position_embeddings`` if smaller.
        batch: sequences decoded together (each has its own KV cache; the weights are read once).
        bandwidth_gb_s: memory bandwidth in GB/s (10^9 bytes).
        kv_dtype: ``bfloat16``, ``float16`` or ``float32``.
        embeddings: ``QuantConfig.embeddings`` of the W8A16 and W8A8 checkpoints.

    Example:
        >>> e = estimate("llama-3-8b/config.json")
        >>> e.weight_bytes["w8a16"] / e.weight_bytes["bf16"]
        0.5004...
    """
    if kv_dtype not in FLOAT_DTYPES:
        raise QuantkitError(f"unknown KV-cache dtype {kv_dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}")
    if batch < 1 or (context is not None and context < 1):
        raise QuantkitError("context and batch must be at least 1")
    if not bandwidth_gb_s > 0:
        raise QuantkitError(f"bandwidth must be a positive number of GB/s, not {bandwidth_gb_s}")
    QuantConfig(embeddings=embeddings)  # an unknown value fails here, before any work
    file, config, notes = read_config(model, progress=progress)
    text = config.get_text_config()
    skeleton = build_skeleton(config, file)

    weight_bytes, lookup_bytes, records = {}, {}, {}
    weight_bytes["fp32"], lookup_bytes["fp32"] = tensor_bytes(skeleton, float_size=4)
    weight_bytes["bf16"], lookup_bytes["bf16"] = tensor_bytes(skeleton)
    for scheme in SCHEMES:
        quantized, records[scheme] = quantized_skeleton(skeleton, QuantConfig(scheme=scheme, embeddings=embeddings))
        weight_bytes[scheme], lookup_bytes[scheme] = tensor_bytes(quantized)
        del quantized
    w8a8 = records["w8a8"]

    kv, how = kv_layers(skeleton, config)
    limit = getattr(text, "max_position_embeddings", None)
    if context is None:
        context = DEFAULT_ESTIMATE_CONTEXT
        if isinstance(limit, int) and 0 < limit < context:
            context = limit
    notes += [how] if how else []
    notes += _notes(text, kv, context, limit)

    inp, out = embeddings_of(skeleton)
    tied = inp is not None and out is not None and getattr(out, "weight", None) is inp.weight
    return Estimate(
        model=str(file),
        model_type=config.model_type,
        architecture=type(skeleton).__name__,
        shape={
            "layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "attention_heads": text.num_attention_heads,
            "kv_heads": kv[0].key_heads,
            "head_dim": kv[0].key_dim,
            "vocab_size": getattr(text, "vocab_size", None),
            "max_position_embeddings": limit,
            "tied_embeddings": tied,
        },
        parameters=count_parameters(skeleton),
        matmul_params=matmul_params(skeleton),
        weight_bytes=weight_bytes,
        lookup_bytes=lookup_bytes,
        quantization={
            "float_dtype": "bfloat16",
            "embeddings": embeddings,
            "embeddings_stored": w8a8.embeddings_label,
            "w8a8": "SmoothQuant, per-token activations",  # alpha changes no byte
            "quantized_layers": len(w8a8.modules),
            "pre_scaled_layers": len(w8a8.pre_scaled or ()),
        },
        kv_layers=kv,
        kv_dtype=kv_dtype,
        context=context,
        batch=batch,
        bandwidth_gb_s=float(bandwidth_gb_s),
        attention_heads=text.num_attention_heads,
        notes=notes,
    )


def _notes(text, kv: list[KVLayer], context: int, limit: int | None) -> list[str]:
    """What a reader of the figures should know about this model."""
    notes = []
    if isinstance(limit, int) and context > limit:
        notes.append(f"context {context} is beyond the model's max_position_embeddings ({limit})")
    windows = sorted({layer.window for layer in kv if layer.window})
    if windows:
        n = sum(1 for layer in kv if layer.window)
        notes.append(
            f"{n} of {len(kv)} layers attend within a sliding window of {'/'.join(map(str, windows))} tokens: "
            "they cache and read at most that many"
        )
    experts = next((getattr(text, f) for f in EXPERT_FIELDS if (getattr(text, f, None) or 0) > 1), None)
    if experts:
        notes.append(
            f"mixture of {experts} experts: FLOPs and bytes read count every expert's linear layers, while a token "
            f"runs {getattr(text, 'num_experts_per_tok', '?')} of them"
        )
    return notes


def format_text(e: Estimate) -> str:
    """The human-readable report of ``quantkit estimate``."""
    d = e.to_dict()
    s = d["shape"]
    lines = [
        f"{e.model}",
        f"{e.architecture} ({e.model_type}): {s['layers']} layers, hidden {s['hidden_size']}, "
        f"{s['attention_heads']} heads / {s['kv_heads']} KV heads of {s['head_dim']}, vocab {s['vocab_size']}, "
        f"{'tied' if s['tied_embeddings'] else 'untied'} lm_head",
        "estimated from the config alone: the model built on the meta device, no weights read",
        "",
        f"{'parameters':<22}{'count':>16}{'share':>9}",
    ]
    total = d["parameters"]["total"]
    for kind, label in PARAM_KINDS.items():
        n = e.parameters[kind]
        if kind == "lm_head" and s["tied_embeddings"]:
            lines.append(f"  {label:<20}{'tied to the embeddings':>25}")
        else:
            lines.append(f"  {label:<20}{n:>16,}{n / total:>9.1%}")
    lines.append(f"  {'total':<20}{total:>16,}")

    q = e.quantization
    lines += ["", f"{'weights (checkpoint)':<22}{'bytes':>16}{'':>10}{'vs bf16':>9}"]
    for v in VARIANTS:
        w = d["weights"][v]
        lines.append(
            f"  {v.upper() if v.startswith('w') else v:<20}{w['bytes']:>16,}{_gb(w['bytes']):>10}{w['vs_bf16']:>9.1%}"
        )
    default = ", the default" if q["embeddings"] == QuantConfig().embeddings else ""
    lines += [
        f"  {q['quantized_layers']} linear layers int8, with an fp32 scale per output channel",
        f"  W8A8 (SmoothQuant, per-token) adds an fp32 pre-scale per input channel to the {q['pre_scaled_layers']} "
        "that no norm precedes",
        f"  {q['embeddings_stored']} (--embeddings {q['embeddings']}{default})",
        f"  other tensors: {q['float_dtype']}",
    ]

    kv = d["kv_cache"]
    per_layer = e.kv_layers[0]
    uniform = all(layer.elements_per_token == per_layer.elements_per_token for layer in e.kv_layers)
    formula = (
        f" = {len(e.kv_layers)} layers x 2 x {per_layer.key_heads} KV heads x {per_layer.key_dim} x "
        f"{dtype_bytes(e.kv_dtype)} B"
        if uniform and per_layer.key_heads == per_layer.value_heads and per_layer.key_dim == per_layer.value_dim
        else ""
    )
    lines += [
        "",
        f"KV cache ({e.kv_dtype}): {kv['bytes_per_token']:,} B per token{formula}",
        f"  context {e.context}, batch {e.batch}: {kv['bytes']:,} B ({_gb(kv['bytes']).strip()})",
    ]

    dec = d["decode"]
    lines += [
        "",
        f"decode, per token at context {e.context}: {_flops(dec['flops_per_token'])} = 2 x "
        f"{dec['matmul_params']:,} matmul weights + {_flops(dec['attention_flops_per_token'])} attention",
        f"bandwidth-bound decode ceiling at {e.bandwidth_gb_s:g} GB/s, batch {e.batch}",
        "  (a step reads the KV cache and every weight but the embedding tables it only looks rows up in)",
        f"  {'':<8}{'weights read':>14}{'KV read':>10}{'tokens/s':>10}",
    ]
    for v in DECODE_VARIANTS:
        c = dec["ceiling"][v]
        lines.append(
            f"  {v.upper() if v.startswith('w') else v:<8}{_gb(c['weight_bytes_read']):>14}"
            f"{_gb(c['kv_bytes_read']):>10}{c['tokens_per_s']:>10.1f}"
        )
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"
