"""transformers integration: ``AutoModelForCausalLM.from_pretrained`` loads quantkit checkpoints.

``import quantkit`` registers the quantization method ``"quantkit"`` (the ``quant_method`` of the
``quantization_config`` that :func:`quantkit.save` writes) with transformers' quantizer registry:
importing this module registers it, and :mod:`quantkit.formats.hf_hook` imports this module as soon as
transformers' registry is imported (not before: that import is slow). From then on::

    import quantkit  # noqa: F401  (registers the "quantkit" quantization method)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("smollm2-w8a8")

builds the model skeleton on the meta device, swaps every layer named in the config's ``modules``
for quantkit's :class:`~quantkit.core.modules.W8A8Linear` / :class:`~quantkit.core.modules.W8A16Linear`, and int8
embeddings for :class:`~quantkit.core.modules.Int8Embedding` / :class:`~quantkit.core.modules.Int8TiedHead` (before any
weight is read, so int8 weights never pass through a float layer) and lets transformers load the
checkpoint into their buffers. The result computes bit-for-bit what :func:`quantkit.load` gives.

Two properties of transformers' loader matter here and are relied on explicitly:

* float tensors are cast to the dtype of the skeleton's tensor, so the fp32 scale buffers stay fp32
  while the rest of the model follows ``dtype=``; int8 weights are never cast;
* the loaded tensors may sit at any offset in memory, so after loading every quantized buffer that
  is not 64-byte aligned is copied (torch's AVX-512 int8 kernels crash on misaligned weights).

The registry (``register_quantizer``/``register_quantization_config``) and this loading behaviour
are those of transformers 5; on older versions nothing is registered and :func:`quantkit.load`
remains the way to load.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import transformers
import transformers.quantizers.auto as _auto
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import transformers_supported
from ..config import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, QuantConfig
from ..core.calibration import DEFAULT_CALIBRATION, ActStats, read_stats_for, read_texts
from ..core.modules import QUANT_MODULES, Int8Embedding
from ..core.quantize import select_targets
from ..core.record import QUANT_METHOD, QuantRecord
from ..errors import QuantkitError
from .float_models import refuse_remote_code
from .native import swap_in_empty_modules
from .safetensors_io import CheckpointReader
from .validate import check_finite, raise_problems, scale_problems, tensor_problems

log = logging.getLogger(__name__)


def supported() -> bool:
    """Whether this transformers (>= 5) has the quantizer registry and the loader quantkit relies on."""
    return (
        transformers_supported()
        and hasattr(_auto, "register_quantizer")
        and hasattr(_auto, "register_quantization_config")
        and hasattr(_auto, "AUTO_QUANTIZER_MAPPING")
    )


class QuantkitHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantkit checkpoint as transformers sees it.

    Holds the block exactly as written (``to_dict`` gives it back unchanged, so ``save_pretrained``
    writes the same thing) and the validated :class:`~quantkit.core.record.QuantRecord` as ``record``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("quant_method", QUANT_METHOD)
        self._block = dict(kwargs)
        self.record = QuantRecord.from_dict(kwargs)  # validates; rejects newer formats
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return dict(self._block)

    def __iter__(self):
        yield from self.to_dict().items()


class QuantkitConfig(QuantizationConfigMixin):
    """Quantize a float model while transformers loads it::

        import quantkit
        model = AutoModelForCausalLM.from_pretrained("my-llama", quantization_config=quantkit.QuantkitConfig("w8a16"))
        model.save_pretrained("my-llama-w8a16")  # a normal quantkit checkpoint

    The arguments are :class:`~quantkit.QuantConfig`'s (a fixed ``alpha``: ``"auto"`` and
    ``max_drift`` measure the whole model at each candidate, which ``quantkit quantize`` does), plus
    how a W8A8 model gets its activation statistics: ``stats``, a file from ``quantkit calibrate``
    made on this model, or else calibration on ``calibration`` (a ``.txt``/``.jsonl`` file; the shipped
    text when None) with ``samples`` windows of ``seq_len`` tokens, using the model folder's tokenizer.
    W8A16 needs no calibration. The model is loaded in float, then quantized in place: peak memory is
    the float model's (``quantkit quantize`` works one layer at a time instead).
    """

    def __init__(
        self,
        scheme: str = "w8a16",
        *,
        stats: str | Path | None = None,
        calibration: str | Path | None = None,
        samples: int = DEFAULT_SAMPLES,
        seq_len: int = DEFAULT_SEQ_LEN,
        **config: Any,
    ) -> None:
        config.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        try:
            self.config = QuantConfig(scheme=scheme, **config)  # validates every value
        except TypeError as e:  # an argument QuantConfig does not have
            raise QuantkitError(f"QuantkitConfig: {str(e).partition('() ')[2] or e}") from None
        if self.config.auto_alpha or self.config.max_drift is not None:
            raise QuantkitError(
                "alpha='auto' and max_drift measure the model quantized at each candidate, which loading cannot: "
                "give a fixed alpha, or run quantkit quantize --alpha auto / --max-drift"
            )
        for name, f in (("stats", stats), ("calibration", calibration)):
            if f is not None and not Path(f).is_file():
                raise QuantkitError(f"{name} file {f} does not exist")
        if int(samples) < 1 or int(seq_len) < 2:
            raise QuantkitError(f"samples must be >= 1 and seq_len >= 2, not {samples} and {seq_len}")
        self.stats = None if stats is None else str(stats)
        self.calibration = None if calibration is None else str(calibration)
        self.samples, self.seq_len = int(samples), int(seq_len)

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, **self.config.to_dict()}
        return d | {
            "stats": self.stats,
            "calibration": self.calibration,
            "samples": self.samples,
            "seq_len": self.seq_len,
        }

    def __iter__(self):
        yield from self.to_dict().items()


class QuantkitHfQuantizer(HfQuantizer):
    """Loads quantkit checkpoints (``config.quantization_config`` a :class:`QuantkitHfConfig`), and
    quantizes float models while loading them (a :class:`QuantkitConfig` passed to ``from_pretrained``)."""

    requires_calibration = False
    quantization_config: QuantkitHfConfig | QuantkitConfig

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized and not isinstance(quantization_config, QuantkitConfig):
            raise QuantkitError(
                "to quantize a float model while loading it, pass quantization_config=quantkit.QuantkitConfig(...)"
            )
        # Quantizing on load: what the checks before weight loading found, used after it.
        self._fingerprint: str | None = None  # of the float model's weights
        self._stats: ActStats | None = None  # from stats=
        self._tokenizer_for_calibration = None  # W8A8 without stats=

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if not self.pre_quantized:
            return self._check_quantize_on_load(model, checkpoint_files)
        record = self.quantization_config.record
        files = _safetensors_files(checkpoint_files)
        folder = files[0].parent if files else None
        if folder is not None:
            refuse_remote_code(folder)
        with CheckpointReader(folder) if folder is not None else contextlib.nullcontext() as reader:
            keys = set(reader.keys()) if reader is not None else set()
            swap_in_empty_modules(model, record, keys, dtype or model.dtype)
            if reader is not None:  # the same validation as quantkit.load, before any weight is read
                infos = {name: reader.info(name) for name in keys}
                problems = tensor_problems(model, record, infos) or scale_problems(reader.get, record, keys)
                raise_problems(folder, problems)
        return model

    def _check_quantize_on_load(self, model, checkpoint_files) -> nn.Module:
        """Everything quantizing on load can get wrong, checked before any weight is read."""
        request: QuantkitConfig = self.quantization_config
        files = _safetensors_files(checkpoint_files)
        folder = files[0].parent if files else None
        if folder is not None:
            refuse_remote_code(folder)
        targets = select_targets(model, request.config)
        if not targets:
            raise QuantkitError(f"no linear layer of this {model.config.model_type} model matches the config")
        self._fingerprint = _fingerprint(folder)
        if request.config.needs_calibration:
            if request.stats is not None:
                stats = self._stats = read_stats_for(request.stats, folder or "this model", self._fingerprint)
                missing = [n for n in targets if n not in stats]
                if missing:
                    raise QuantkitError(
                        f"statistics {request.stats} have no entry for {missing[0]} (and {len(missing) - 1} more): "
                        "they were made on another model; recalibrate with quantkit calibrate"
                    )
            else:
                self._tokenizer_for_calibration = self._tokenizer(folder)  # refused now if the folder has none
                read_texts(request.calibration or DEFAULT_CALIBRATION)  # and an unreadable text
        return model

    def _tokenizer(self, folder: Path | None):
        from transformers import AutoTokenizer

        if folder is None:
            raise QuantkitError(
                "W8A8 calibrates with the model folder's tokenizer: load from a local folder, or pass stats="
            )
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise QuantkitError(
                f"cannot load the tokenizer of {folder} to calibrate W8A8 ({str(e).strip().splitlines()[0]}): "
                "pass stats= from quantkit calibrate"
            ) from None

    def _quantize_loaded(self, model) -> nn.Module:
        """Quantize the float model transformers just loaded; make its config a quantkit checkpoint's."""
        from ..core.quantize import calibrate, quantize

        request: QuantkitConfig = self.quantization_config
        model.config.quantization_config = None  # quantize() refuses models that already carry one
        stats = self._stats  # read and checked before the weights loaded
        if request.config.needs_calibration and stats is None:
            stats = calibrate(
                model,
                self._tokenizer_for_calibration,
                request.calibration,
                request.config,
                n_samples=request.samples,
                seq_len=request.seq_len,
            )
        quantize(model, request.config, stats)
        block = dict(model.config.quantization_config)
        if self._fingerprint:
            block["source_fingerprint"] = self._fingerprint
        self.quantization_config = QuantkitHfConfig(**block)
        model.config.quantization_config = self.quantization_config
        self.pre_quantized = True  # from here on it is a quantkit checkpoint, saved as one
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            model = self._quantize_loaded(model)
        record = self.quantization_config.record
        where = getattr(model.config, "_name_or_path", "") or "the checkpoint"
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t is not None and not t.is_meta:
                check_finite(name, t, where)
        placed = set((getattr(model, "hf_device_map", None) or {}).values())
        if record.tied_embeddings and len(placed) > 1:
            # Int8TiedHead owns no tensors, so accelerate cannot keep it beside the table it reads.
            raise QuantkitError(
                f"this checkpoint's lm_head reads the int8 embedding table, which cannot be split over "
                f"devices {sorted(map(str, placed))}; load it on one device (device_map=None or one device), "
                "or quantize with --embeddings float"
            )
        # Copy misaligned quantized buffers into fresh (64-byte aligned) allocations; see module docstring.
        for module in model.modules():
            if isinstance(module, (*QUANT_MODULES.values(), Int8Embedding)):
                for name, buf in list(module.named_buffers(recurse=False)):
                    if buf is not None and buf.device.type == "cpu" and buf.data_ptr() % 64:
                        setattr(module, name, buf.clone())
            if isinstance(module, Int8Embedding):
                # transformers re-creates non-persistent buffers uninitialized and leaves their
                # values to the model's _init_weights, which does not know this module.
                module.reset_embed_scale()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _fingerprint(folder: Path | None) -> str | None:
    """The float model's fingerprint (what a checkpoint records as its source), if it is a local folder."""
    if folder is None:
        return None
    with CheckpointReader(folder) as reader:
        return reader.fingerprint()


def _safetensors_files(checkpoint_files: list[str] | None) -> list[Path]:
    """The checkpoint's safetensors files (one or all shards, in one folder); anything else is refused."""
    files = [Path(f) for f in checkpoint_files or []]
    for f in files:
        if f.suffix != ".safetensors":
            raise QuantkitError(f"quantkit checkpoints are safetensors; got {f}")
    return files


def register() -> bool:
    """Register ``"quantkit"`` with transformers once; return whether it is registered.

    Idempotent (a second call, or a reload of quantkit, leaves the first registration in place).
    """
    if not supported():
        log.debug("transformers %s: quantkit checkpoints load with quantkit.load() only", transformers.__version__)
        return False
    if QUANT_METHOD not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _auto.register_quantization_config(QUANT_METHOD)(QuantkitHfConfig)
    if QUANT_METHOD not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)
    return True


register()  # on import: quantkit.formats.hf_hook imports this module when transformers' registry loads
