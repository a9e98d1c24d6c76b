"""The record of what :func:`quantkit.quantize` did to a model, and its on-disk form.

A :class:`QuantRecord` is the user's :class:`~quantkit.QuantConfig` plus what quantization made of it
on this model: the linear layers it converted and how it stored the embedding tables. A quantized
model carries it as ``model.config.quantization_config`` (a dict, transformers' convention), so it is
written into the checkpoint's ``config.json`` and read back from there: a checkpoint always says how
it was made and which tensors it must hold. The block is flat, the config's fields beside the
record's::

    {"quant_method": "quantkit", "format_version": 3, "tool_version": "0.1.0",
     "scheme": "w8a8", ..., "modules": [...], "input_embedding": "model.embed_tokens", ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..config import QuantConfig
from ..errors import QuantkitError

# Bumped when the on-disk layout of a quantized checkpoint changes. 2: int8 embeddings. 3: the record
# lists the pre-scaled layers and the source model's fingerprint (older quantkits refuse the new
# fields, so they are told to upgrade instead). 4: the migration strength alpha="auto" chose, and the
# search behind it (written only by checkpoints that have them: the others stay readable by format-3
# quantkits). Also 4: layers kept in W8A16 within a W8A8 checkpoint (--max-drift).
FORMAT_VERSION = 4
QUANT_METHOD = "quantkit"

# Fields of the block that belong to the record, not to the QuantConfig; introduced in format 2
# except ``modules``. ``source_fingerprint`` and ``pre_scaled`` are optional (absent from older checkpoints).
_RECORD_FIELDS = (
    "modules",
    "input_embedding",
    "output_embedding",
    "tied_embeddings",
    "source_fingerprint",
    "pre_scaled",
    "alpha_search",
    "w8a16_modules",
    "drift_search",
)


@dataclass(frozen=True)
class QuantRecord:
    """What was quantized, and how.

    Attributes:
        config: what the user asked for.
        modules: fully-qualified names of the linear layers quantized with ``config.scheme``.
        input_embedding: the :class:`~quantkit.core.modules.Int8Embedding`, ``""`` if float.
        output_embedding: the int8 ``lm_head`` (weight-only whatever the scheme), ``""`` if none.
        tied_embeddings: the two share one int8 table (stored once, under the input embedding).
        pre_scaled: the layers among ``modules`` that carry a run-time SmoothQuant pre-scale
            (``smooth_inv``), so that a checkpoint missing one is refused; None where unrecorded.
        source_fingerprint: :meth:`~quantkit.formats.safetensors_io.CheckpointReader.fingerprint` of
            the float checkpoint it was made from (``quantkit quantize`` records it; ``""`` if
            unknown), so that ``quantkit eval`` can refuse a baseline that is another model.
        alpha_search: with ``alpha="auto"``, what was chosen and why: ``{"chosen": alpha, "alphas":
            [candidates], "calibration_loss": [mean next-token loss of the model quantized at each],
            "float_loss": the float model's, "tokens": how many}``; None otherwise.
        w8a16_modules: layers among ``modules`` stored W8A16 although the scheme is W8A8 (the
            most sensitive ones, kept to meet ``max_drift``); empty for a single-scheme checkpoint.
        drift_search: with ``max_drift``, the candidates tried and the calibration drift of each
            (see :func:`quantkit.core.sequential.choose_w8a16_layers`); None otherwise.
        tool_version: the quantkit that made it (information only; not compared).
    """

    config: QuantConfig
    modules: tuple[str, ...] = ()
    input_embedding: str = ""
    output_embedding: str = ""
    tied_embeddings: bool = False
    source_fingerprint: str = ""
    pre_scaled: tuple[str, ...] | None = None
    alpha_search: dict[str, Any] | None = None
    w8a16_modules: tuple[str, ...] = ()
    drift_search: dict[str, Any] | None = None
    tool_version: str = field(default=__version__, compare=False)

    def __post_init__(self) -> None:
        modules = (self.modules,) if isinstance(self.modules, str) else self.modules
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
            raise QuantkitError("quantization_config 'modules' must be a list of module names")
        object.__setattr__(self, "modules", tuple(modules))
        for name in ("input_embedding", "output_embedding"):
            if not isinstance(getattr(self, name), str):
                raise QuantkitError(f"quantization_config {name!r} must be a module name or empty")
        if not isinstance(self.tied_embeddings, bool):
            raise QuantkitError("quantization_config 'tied_embeddings' must be true or false")
        if self.pre_scaled is not None:
            if not isinstance(self.pre_scaled, (list, tuple)) or not all(m in modules for m in self.pre_scaled):
                raise QuantkitError("quantization_config 'pre_scaled' must list quantized modules")
            object.__setattr__(self, "pre_scaled", tuple(self.pre_scaled))
        kept = (self.w8a16_modules,) if isinstance(self.w8a16_modules, str) else self.w8a16_modules
        if not isinstance(kept, (list, tuple)) or not all(m in modules for m in kept):
            raise QuantkitError("quantization_config 'w8a16_modules' must list quantized modules")
        if kept and self.config.scheme != "w8a8":
            raise QuantkitError("quantization_config 'w8a16_modules' is for W8A8 checkpoints only")
        object.__setattr__(self, "w8a16_modules", tuple(kept))
        if self.drift_search is not None and not isinstance(self.drift_search, dict):
            raise QuantkitError("quantization_config 'drift_search' must be a JSON object")
        if self.alpha_search is not None:
            object.__setattr__(self, "alpha_search", _checked_alpha_search(self.alpha_search))
        if not isinstance(self.source_fingerprint, str):
            raise QuantkitError("quantization_config 'source_fingerprint' must be a string")
        if self.tied_embeddings and not (self.input_embedding and self.output_embedding):
            raise QuantkitError("quantization_config ties the embeddings but does not name both of them")

    def scheme_of(self, module: str) -> str:
        """The scheme a quantized linear layer of ``modules`` is stored in."""
        return "w8a16" if module in self.w8a16_modules else self.config.scheme

    @property
    def label(self) -> str:
        """The config's label with what the searches chose, e.g. ``W8A8 SmoothQuant a=auto (0.65) per-token``."""
        label = self.config.label
        if self.alpha_search:
            label = label.replace("a=auto", f"a=auto ({self.alpha_search['chosen']:g})")
        if self.w8a16_modules:
            label += f", {len(self.w8a16_modules)}/{len(self.modules)} layers W8A16"
        return label

    @property
    def embeddings_label(self) -> str:
        """How the model stores its embedding and ``lm_head``, e.g. for reports."""
        if self.tied_embeddings:
            return "embedding and lm_head: one int8 table, per-row scales; lm_head weight-only"
        if any(m.rpartition(".")[2] == "lm_head" for m in self.modules):
            head = "lm_head in the scheme"
        else:
            head = "lm_head int8 weight-only" if self.output_embedding else "lm_head float"
        return f"embedding {'int8' if self.input_embedding else 'float'}, {head}"

    @property
    def quantized_modules(self) -> tuple[str, ...]:
        """Every module holding int8 tensors: the linear layers and the int8 embedding tables."""
        return (*self.modules, *(n for n in (self.input_embedding, self.output_embedding) if n))

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block written to ``config.json``."""
        return {
            "quant_method": QUANT_METHOD,
            # the oldest format that holds it
            "format_version": FORMAT_VERSION if self.alpha_search or self.w8a16_modules or self.drift_search else 3,
            "tool_version": self.tool_version,
            **self.config.to_dict(),
            "modules": list(self.modules),
            "input_embedding": self.input_embedding,
            "output_embedding": self.output_embedding,
            "tied_embeddings": self.tied_embeddings,
            **({"pre_scaled": list(self.pre_scaled)} if self.pre_scaled is not None else {}),
            **({"source_fingerprint": self.source_fingerprint} if self.source_fingerprint else {}),
            **({"alpha_search": self.alpha_search} if self.alpha_search else {}),
            **({"w8a16_modules": list(self.w8a16_modules)} if self.w8a16_modules else {}),
            **({"drift_search": self.drift_search} if self.drift_search else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> QuantRecord:
        """Inverse of :meth:`to_dict`; rejects other methods, newer formats and malformed fields."""
        if not isinstance(d, dict):
            raise QuantkitError("quantization_config must be a JSON object")
        d = dict(d)
        method = d.pop("quant_method", None)
        if method != QUANT_METHOD:
            raise QuantkitError(f"quantization_config is for {method!r}, not quantkit")
        version = d.pop("format_version", None)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise QuantkitError(f"quantization_config has format_version {version!r}, not a positive integer")
        if version > FORMAT_VERSION:
            raise QuantkitError(
                f"checkpoint format version {version} is not supported by this quantkit "
                f"(supports <= {FORMAT_VERSION}); upgrade quantkit"
            )
        tool_version = str(d.pop("tool_version", "?"))
        if version < 2:  # format 1 predates int8 embeddings: its embeddings are float
            d.setdefault("embeddings", "float")
        record = {k: d.pop(k) for k in _RECORD_FIELDS if k in d}
        try:
            config = QuantConfig.from_dict(d)
        except TypeError as e:  # a field of the wrong type that the dataclass could not take
            raise QuantkitError(f"quantization_config is malformed: {e}") from None
        return cls(config, **record, tool_version=tool_version)


def _checked_alpha_search(d: Any) -> dict[str, Any]:
    """A valid ``alpha_search`` block, or a :class:`QuantkitError`."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    bad = QuantkitError(
        "quantization_config 'alpha_search' must hold 'chosen', 'alphas' and 'calibration_loss' (numbers, lists of "
        "equal length)"
    )
    if not isinstance(d, dict) or not number(d.get("chosen")) or not 0.0 <= d["chosen"] <= 1.0:
        raise bad
    alphas, losses = d.get("alphas"), d.get("calibration_loss")
    if not isinstance(alphas, list) or not isinstance(losses, list) or len(alphas) != len(losses) or not alphas:
        raise bad
    if not all(number(v) for v in (*alphas, *losses)):
        raise bad
    return dict(d)


def record_of(model: Any) -> QuantRecord:
    """The :class:`QuantRecord` of a model quantized by quantkit, however it was loaded.

    ``quantkit.quantize`` and ``quantkit.load`` keep the block as a dict; transformers'
    ``from_pretrained`` as a config object whose ``to_dict()`` is that same dict.
    """
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict) and hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise QuantkitError("model is not quantized by quantkit; call quantkit.quantize() first")
    return QuantRecord.from_dict(qc)
