"""Typed, validated, versioned quantization config.

:class:`QuantConfig` is the single description of what quantkit does to a model. It is validated
on construction, written into the checkpoint's ``config.json`` as ``quantization_config`` and read
back from there, so a checkpoint always says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import QuantkitError

# Bumped when the on-disk layout of a quantized checkpoint changes. 2: int8 embeddings.
FORMAT_VERSION = 2
QUANT_METHOD = "quantkit"

Scheme = Literal["w8a16", "w8a8"]
ActGranularity = Literal["per_token", "per_tensor"]
Smoothing = Literal["smoothquant", "none"]
Embeddings = Literal["int8", "float"]

SCHEMES = ("w8a16", "w8a8")
ACT_GRANULARITIES = ("per_token", "per_tensor")
SMOOTHINGS = ("smoothquant", "none")
EMBEDDINGS = ("int8", "float")

# Defaults shared by the API and the CLI (which imports this module, not torch, to build --help).
DEFAULT_ALPHA = 0.5  # the SmoothQuant paper's migration strength
DEFAULT_SAMPLES = 16  # calibration windows
DEFAULT_SEQ_LEN = 512  # tokens per calibration window
DEFAULT_EVAL_WINDOW = 512  # tokens per perplexity window
DEFAULT_EVAL_WINDOWS = 32  # perplexity windows


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
            of their range into the weights.
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
    """

    scheme: Scheme = "w8a8"
    activations: ActGranularity = "per_token"
    smoothing: Smoothing = "smoothquant"
    alpha: float = DEFAULT_ALPHA
    fallback_smoothing: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    embeddings: Embeddings = "int8"
    # Filled in by quantize(): what was quantized. Not part of what a user asks for.
    modules: tuple[str, ...] = field(default=(), compare=False)  # linear layers, in the scheme
    input_embedding: str = field(default="", compare=False)  # the Int8Embedding, "" if float
    output_embedding: str = field(default="", compare=False)  # the int8 lm_head (W8A16), "" if none
    tied_embeddings: bool = field(default=False, compare=False)  # the two share one int8 table

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
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise QuantkitError(f"alpha must be between 0 and 1, got {self.alpha}")
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable and frozen.
        for name in ("include", "exclude", "modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    @property
    def needs_calibration(self) -> bool:
        """Whether activation statistics are needed (smoothing or static activation scales)."""
        return self.scheme == "w8a8" and (self.smoothing != "none" or self.activations == "per_tensor")

    @property
    def label(self) -> str:
        """Short human name, e.g. ``W8A8 SmoothQuant a=0.5 per-token``."""
        if self.scheme == "w8a16":
            return "W8A16"
        smooth = f"SmoothQuant a={self.alpha:g}" if self.smoothing == "smoothquant" else "naive"
        return f"W8A8 {smooth} {self.activations.replace('_', '-')}"

    @property
    def embeddings_label(self) -> str:
        """How a quantized model stores its embedding and ``lm_head``, e.g. for reports."""
        if self.tied_embeddings:
            return "embedding and lm_head: one int8 table, per-row scales; lm_head weight-only"
        if any(m.rpartition(".")[2] == "lm_head" for m in self.modules):
            head = "lm_head in the scheme"
        else:
            head = "lm_head int8 weight-only" if self.output_embedding else "lm_head float"
        return f"embedding {'int8' if self.input_embedding else 'float'}, {head}"

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block written to ``config.json``."""
        from ._version import __version__

        d = dataclasses.asdict(self)
        for key in ("include", "exclude", "modules"):
            d[key] = list(d[key])
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            **d,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; rejects other methods and newer formats with a clear error."""
        d = dict(d)
        method = d.pop("quant_method", None)
        if method != QUANT_METHOD:
            raise QuantkitError(f"quantization_config is for {method!r}, not quantkit")
        version = d.pop("format_version", None)
        if version is None or version > FORMAT_VERSION:
            raise QuantkitError(
                f"checkpoint format version {version} is not supported by this quantkit "
                f"(supports <= {FORMAT_VERSION}); upgrade quantkit"
            )
        d.pop("tool_version", None)
        if version < 2:  # format 1 predates int8 embeddings: its embeddings are float
            d.setdefault("embeddings", "float")
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
