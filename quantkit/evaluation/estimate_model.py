"""The model side of :mod:`quantkit.evaluation.estimate`: a config read and built on the meta device,
and what is counted on that skeleton (parameters by kind, checkpoint bytes as quantkit writes them,
what each layer's KV cache holds). No weights are read.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import DEFAULT_MODEL, QuantConfig, matches
from ..core import arch
from ..core.modules import Int8Embedding, embeddings_of
from ..core.quantize import plan_embeddings, select_targets
from ..core.record import QuantRecord
from ..core.smoothquant import smoothing_groups
from ..errors import QuantkitError

log = logging.getLogger(__name__)

# The kinds parameters are counted by, in print order, with their labels.
PARAM_KINDS = {
    "embeddings": "embeddings",
    "attention": "attention linears",
    "mlp": "MLP linears",
    "lm_head": "lm_head",
    "other": "norms and other",
}
# Linear layers by a component of their qualified name (``model.layers.0.self_attn.q_proj``: attention);
# a linear matching neither kind (e.g. OPT's project_in) counts as "other".
LINEAR_KINDS = (
    ("attention", ("attn", "attention")),
    ("mlp", ("mlp", "feed_forward", "ffn", "fc1", "fc2", "expert")),
)
# The checkpoint variants estimated, and those whose decode speed is.
VARIANTS = ("fp32", "bf16", "w8a16", "w8a8")
DECODE_VARIANTS = ("bf16", "w8a16", "w8a8")
# Config fields without which transformers would fill in its default model's size: required.
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers")
# Config fields whose defaults are common in real configs (Gemma 3's text_config): noted when defaulted.
_NOTED_FIELDS = ("vocab_size", "num_attention_heads")
# Config fields that say a model routes each token through some of its experts.
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
_PROBE_TOKENS = 3  # tokens of the meta-device forward that fills the KV cache


@dataclass(frozen=True)
class KVLayer:
    """What one layer caches per token: key and value heads and head sizes, and its sliding window."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    window: int | None = None

    @property
    def elements_per_token(self) -> int:
        return self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def tokens_held(self, context: int) -> int:
        """Tokens of a ``context``-token sequence that the layer caches and attends to."""
        return min(context, self.window) if self.window else context


def read_config(model: str | Path, *, progress: bool = True):
    """``(config file, transformers config, notes)`` for ``model``; a :class:`QuantkitError` that says
    what to do for anything quantkit would not quantize. No code from a model folder is run."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..formats.float_models import check_causal_lm, resolve

    source = resolve(DEFAULT_MODEL, progress=progress) if str(model) == DEFAULT_MODEL else Path(model)
    if source.is_dir():
        file = source / "config.json"
        if not file.is_file():
            raise QuantkitError(f"{source} has no config.json; pass a Hugging Face model folder or its config.json")
    elif source.is_file():
        file = source
    else:
        raise QuantkitError(f"model {model} not found: pass a local model folder, its config.json, or {DEFAULT_MODEL}")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise QuantkitError(f"{file} is not valid JSON; pass a model's config.json") from None
    if not isinstance(d, dict):
        raise QuantkitError(f"{file} is not a model config (a JSON object); pass a model's config.json")
    if "auto_map" in d:
        raise QuantkitError(
            f"{file} has an auto_map: the model needs Python code from its folder, which quantkit never runs; "
            "use a model whose architecture transformers ships"
        )
    if d.get("quantization_config") is not None:
        raise QuantkitError(
            f"{file} is a quantized checkpoint's config; estimate the float model it was made from "
            "(quantkit inspect describes a checkpoint)"
        )
    model_type = d.get("model_type")
    if not model_type:
        raise QuantkitError(
            f'{file} has no model_type; it is not a Hugging Face model config (e.g. "model_type": "llama")'
        )
    if model_type not in CONFIG_MAPPING:
        raise QuantkitError(
            f"{file}: model_type {model_type!r} is unknown to transformers {transformers_version}; a newer "
            "transformers may know it (pip install -U transformers); quantkit never runs a model's own code"
        )
    config = check_causal_lm(source if source.is_dir() else file)
    text = config.get_text_config()
    raw = d.get("text_config") if text is not config and isinstance(d.get("text_config"), dict) else d
    aliases = getattr(type(text), "attribute_map", {})  # e.g. GPT-2: hidden_size -> n_embd

    def given(name: str) -> bool:
        return name in raw or aliases.get(name) in raw

    missing = [f for f in _SIZE_FIELDS if not given(f)]
    if missing:
        raise QuantkitError(
            f"{file} does not set {' and '.join(missing)}: transformers would fill in the size of its default "
            f"{model_type} model, not this one; add {'them' if len(missing) > 1 else 'it'} to the config"
        )
    notes = []
    defaulted = [f for f in _NOTED_FIELDS if not given(f) and hasattr(text, f)]
    if defaulted:
        values = ", ".join(f"{f} {getattr(text, f)}" for f in defaulted)
        notes.append(f"the config does not set {' or '.join(defaulted)}: transformers' defaults used ({values})")
    return file, config, notes


def build_skeleton(config, file: Path) -> nn.Module:
    """The causal LM of ``config`` in bf16 on the meta device (shapes only), with transformers' own code."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=False).eval()
    except Exception as e:  # whatever the config's values make the model code raise
        raise QuantkitError(
            f"cannot build the model of {file} from its config ({_first_line(e)}); fix the config"
        ) from None


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by kind (:data:`PARAM_KINDS`); shared ones (a tied table) once, as the input embedding."""
    inp, out = embeddings_of(model)
    counts = dict.fromkeys(PARAM_KINDS, 0)
    seen: set[int] = set()
    modules = [("", inp)] if inp is not None else []  # a tied table counts as the embedding
    for name, module in [*modules, *model.named_modules()]:
        if module is out:
            kind = "lm_head"
        elif module is inp or isinstance(module, nn.Embedding):
            kind = "embeddings"
        elif _is_linear(module):
            kind = linear_kind(name)
        else:
            kind = "other"
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[kind] += p.numel()
    return counts


def linear_kind(name: str) -> str:
    """``attention``, ``mlp`` or ``other``, by :data:`LINEAR_KINDS`."""
    parts = name.split(".")
    for kind, markers in LINEAR_KINDS:
        if any(marker in part for part in parts for marker in markers):
            return kind
    return "other"


def matmul_params(model: nn.Module) -> int:
    """Weights of every linear layer a token goes through: ``lm_head`` too when it reads the embedding
    table; not the modules the architecture table never quantizes (a vision tower)."""
    skip = arch.spec_of(model).exclude
    return sum(m.weight.numel() for name, m in model.named_modules() if _is_linear(m) and not matches(name, skip))


def quantized_skeleton(skeleton: nn.Module, config: QuantConfig) -> tuple[nn.Module, QuantRecord]:
    """A meta-device copy of ``skeleton`` holding the empty modules and buffers that a checkpoint of
    ``config`` holds, decided as :func:`quantkit.quantize` decides, and the record it would write."""
    from ..formats.native import swap_in_empty_modules

    model = copy.deepcopy(skeleton)
    targets = select_targets(model, config)
    pre_scaled: tuple[str, ...] = ()
    if config.scheme == "w8a8" and config.smoothing == "smoothquant":
        # Calibration records every target; only which layers have statistics matters here.
        groups = smoothing_groups(model, targets, dict.fromkeys(targets), fallback=config.fallback_smoothing)
        pre_scaled = tuple(n for norm, linears in groups if norm is None for n in linears)
    keys = {f"{n}.smooth_inv" for n in pre_scaled}
    if config.scheme == "w8a8" and config.activations == "per_tensor":
        keys |= {f"{n}.input_scale" for n in targets}
    dtype = torch.bfloat16
    # As quantize() does: the linear layers first, then the embeddings of what remains float.
    swap_in_empty_modules(model, QuantRecord(config, modules=tuple(targets)), keys, dtype)
    inp_name = out_name = ""
    tied = False
    if config.embeddings == "int8":
        in_ok, out_ok, tied = plan_embeddings(model)
        inp, out = embeddings_of(model)
        names = {id(m): n for n, m in model.named_modules()}
        inp_name = names[id(inp)] if in_ok else ""
        out_name = names[id(out)] if out_ok else ""
        tied = tied and in_ok and out_ok
        if tied and getattr(out, "bias", None) is not None:
            keys.add(f"{out_name}.bias")
        record = QuantRecord(config, input_embedding=inp_name, output_embedding=out_name, tied_embeddings=tied)
        swap_in_empty_modules(model, record, keys, dtype)
    record = QuantRecord(
        config,
        modules=tuple(targets),
        input_embedding=inp_name,
        output_embedding=out_name,
        tied_embeddings=tied,
        pre_scaled=pre_scaled,
    )
    return model, record


def tensor_bytes(model: nn.Module, float_size: int | None = None) -> tuple[int, int]:
    """``(bytes of the state dict, bytes of the tables only looked up)``, each tensor once (a tied table
    is stored once). ``float_size`` overrides the bytes per element of float tensors (4: fp32).

    The second figure is the embedding tables a decode step reads one row of, not whole: all of them
    but a table the output projection multiplies by (tied)."""
    out = embeddings_of(model)[1]
    head = {id(getattr(out, a, None)) for a in ("weight", "weight_scale")} if out is not None else set()
    seen: set[int] = set()
    total = lookup = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = float_size if float_size and t.is_floating_point() else t.element_size()
        nbytes = t.numel() * size
        total += nbytes
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, (nn.Embedding, Int8Embedding)) and id(t) not in head:
            lookup += nbytes
    return total, lookup


def kv_layers(model: nn.Module, config) -> tuple[list[KVLayer], str]:
    """What each layer caches per token, read from the cache the model fills in a forward of a few
    tokens on the meta device; ``how`` is empty then. Where that forward fails (code that needs values,
    as some mixture-of-experts routing does), from the config: ``num_key_value_heads`` (else the
    attention heads) of ``head_dim`` (else hidden / heads) in every layer, and ``how`` says so."""
    try:
        with torch.device("meta"), torch.no_grad():
            output = model(input_ids=torch.zeros(1, _PROBE_TOKENS, dtype=torch.long), use_cache=True)
        cache = next((output[k] for k in ("cache", "past_key_values") if k in output), None)  # transformers 5 / 4
        if cache is None:
            raise ValueError("the model returned no KV cache")
        layers = []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            if k.ndim != 4 or v.ndim != 4 or k.shape[2] != _PROBE_TOKENS or v.shape[2] != _PROBE_TOKENS:
                raise ValueError(f"unexpected cache shapes {list(k.shape)}, {list(v.shape)}")
            layers.append(
                KVLayer(k.shape[1], k.shape[3], v.shape[1], v.shape[3], getattr(layer, "sliding_window", None))
            )
        if not layers:
            raise ValueError("the model filled no cache")
        return layers, ""
    except Exception as e:  # any failure of the probe: the config's figures instead
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        how = (
            f"KV cache from the config ({kv_heads} KV heads of {head_dim} in every layer, no sliding window): "
            f"the model did not run on the meta device ({_first_line(e)})"
        )
        log.debug("KV-cache probe failed", exc_info=True)
        return [KVLayer(kv_heads, head_dim, kv_heads, head_dim)] * text.num_hidden_layers, how


def dtype_bytes(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, name)).element_size()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip().rstrip(":")
