"""The public verbs: :func:`select_targets`, :func:`calibrate`, :func:`quantize`.

``quantize`` works in place on a float transformers model, in three steps that keep the algorithm
apart from the module surgery:

1. decide the float ``[out, in]`` weight (and run-time pre-scale) for every target layer,
   folding SmoothQuant scales into norms where the architecture table maps them;
2. derive static activation scales from the (smoothed) calibration statistics if asked;
3. swap each target for its quantized module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, QuantConfig, matches
from ..errors import QuantkitError
from ..qmath import abs_max_scale
from . import arch
from .calibration import (
    DEFAULT_CALIBRATION,
    ActStats,
    collect_stats,
    make_samples,
    read_texts,
)
from .modules import (
    FLOAT_LINEARS,
    QUANT_MODULES,
    Int8Embedding,
    Int8TiedHead,
    W8A8Linear,
    W8A16Linear,
    embeddings_of,
    is_float_embedding,
    is_float_linear,
    replace_module,
    weight_out_in,
)
from .record import QuantRecord
from .search import needs_search
from .smoothquant import apply_smoothquant

log = logging.getLogger(__name__)


def select_targets(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Float linear layers to quantize, by fully-qualified name, after include/exclude patterns."""
    spec = arch.spec_of(model)
    exclude = config.exclude + spec.exclude
    targets = {
        name: m
        for name, m in model.named_modules()
        if is_float_linear(m) and (not config.include or matches(name, config.include)) and not matches(name, exclude)
    }
    if not targets:
        raise QuantkitError(
            "no linear layers matched the include/exclude patterns; check --include/--exclude "
            f"(include={list(config.include)}, exclude={list(exclude)})"
        )
    return targets


def calibrate(
    model: nn.Module,
    tokenizer,
    texts: list[str] | str | Path | None = None,
    config: QuantConfig | None = None,
    *,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> ActStats:
    """Activation statistics for the layers ``config`` would quantize.

    Args:
        texts: a list of strings, or a path to a ``.txt``/``.jsonl`` file; the shipped default
            (Jane Austen's *Persuasion*) when None.
    Returns:
        ``{module name: fp32 [in] per-input-channel abs-max}``.
    """
    config = config or QuantConfig()
    if texts is None or isinstance(texts, (str, Path)):
        texts = read_texts(texts or DEFAULT_CALIBRATION)
    samples = make_samples(tokenizer, texts, n_samples, seq_len)
    log.info("calibrating on %d samples x %d tokens", samples.shape[0], samples.shape[1])
    return collect_stats(model, samples, select_targets(model, config), progress=progress)


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    stats: ActStats | None = None,
    *,
    w8a16: set[str] | frozenset[str] = frozenset(),
    progress: bool = True,
) -> nn.Module:
    """Quantize a float transformers model in place and return it.

    Args:
        model: a float ``PreTrainedModel`` (any causal LM; unknown architectures use the fallback).
        config: what to do; W8A8 SmoothQuant per-token by default.
        stats: activation statistics from :func:`calibrate`; required when
            ``config.needs_calibration``. Not modified.
        w8a16: with a W8A8 config, layers to store W8A16 instead (e.g. the ones
            ``quantkit quantize --max-drift`` keeps; the checkpoint records them).

    Example:
        >>> stats = quantkit.calibrate(model, tokenizer)
        >>> quantkit.quantize(model, QuantConfig(scheme="w8a8", alpha=0.5), stats)
    """
    config = config or QuantConfig()
    if getattr(model.config, "quantization_config", None) is not None:
        raise QuantkitError("this model is already quantized; start from the float model")
    if config.auto_alpha:
        raise QuantkitError(
            "alpha='auto' is chosen on the calibration loss of the model quantized at each candidate alpha: "
            "use quantkit.quantize_to_disk (quantkit quantize --alpha auto), or a fixed alpha here"
        )
    if config.max_drift is not None:
        raise QuantkitError(
            "max_drift measures the whole quantized model on calibration text layer by layer: use "
            "quantkit.quantize_to_disk (quantkit quantize --max-drift), or name the layers to keep with w8a16="
        )
    if needs_search(config):
        log.warning(
            "static activation scales from statistics alone use the calibration abs-max; quantkit.quantize_to_disk "
            "(quantkit quantize) chooses them by searching a clipping ratio on the calibration activations"
        )
    targets = select_targets(model, config)
    check_stats(targets, stats, config)
    unknown = set(w8a16) - set(targets)
    if unknown:
        raise QuantkitError(f"w8a16 names layers that are not quantized: {sorted(unknown)[:3]}")
    if w8a16 and config.scheme != "w8a8":
        raise QuantkitError("w8a16 keeps layers of a W8A8 model weight-only; the scheme is not W8A8")
    quantize_targets(model, targets, stats, config, w8a16=w8a16, progress=progress)
    return finish(model, config, tuple(targets))


def check_stats(targets: dict[str, nn.Module], stats: ActStats | None, config: QuantConfig) -> None:
    """Fail before any change if ``config`` needs statistics that ``stats`` lacks."""
    if not config.needs_calibration:
        return
    if stats is None:
        raise QuantkitError(f"{config.label} needs calibration statistics: run quantkit.calibrate() first")
    missing = [n for n in targets if n not in stats]
    if missing:
        raise QuantkitError(
            f"calibration statistics lack {len(missing)} target layers (e.g. {missing[0]}); "
            "recalibrate with the same model and include/exclude patterns"
        )
    for name, module in targets.items():
        amax = stats[name]
        width = weight_out_in(module).shape[1]
        if amax.shape != (width,):
            raise QuantkitError(
                f"calibration statistics for {name} have shape {list(amax.shape)}, the layer takes {width} "
                "inputs: they come from another model; recalibrate"
            )
        if not torch.isfinite(amax).all():
            raise QuantkitError(
                f"calibration statistics for {name} hold NaN or Inf (the model overflows on the calibration "
                "text, or its weights are damaged); check the model or calibrate in float32"
            )


@torch.no_grad()
def quantize_targets(
    model: nn.Module,
    targets: dict[str, nn.Module],
    stats: ActStats | None,
    config: QuantConfig,
    *,
    clips: dict[str, float] | None = None,
    w8a16: set[str] | frozenset[str] = frozenset(),
    progress: bool = False,
) -> None:
    """Smooth (W8A8 SmoothQuant) and swap ``targets`` for quantized modules, in place.

    ``targets`` may be any subset of :func:`select_targets`, e.g. one decoder layer's linears with
    that layer's statistics (the layer-by-layer pipeline): smoothing only touches the groups whose
    linears have statistics, and each layer's groups lie within it. ``clips`` (from
    :func:`quantkit.core.search.search_layer`) scale the calibration abs-max of static activation
    scales, by layer name (1 where absent).
    """
    clips = clips or {}
    scales: dict[str, torch.Tensor] = {}
    smooth_inv: dict[str, torch.Tensor] = {}
    if config.scheme == "w8a8" and config.smoothing == "smoothquant":
        scales, smooth_inv, stats = apply_smoothquant(model, targets, stats, config)
        for name in w8a16:  # a weight-only layer needs no run-time pre-scale
            if smooth_inv.pop(name, None) is not None:
                scales.pop(name)

    for name, module in tqdm(targets.items(), desc=f"Quantizing {config.label}", unit="layer", disable=not progress):
        cls = QUANT_MODULES["w8a16" if name in w8a16 else config.scheme]
        kwargs = {}
        if cls is W8A8Linear:
            kwargs["smooth_inv"] = smooth_inv.get(name)
            if config.activations == "per_tensor":
                kwargs["input_scale"] = abs_max_scale(stats[name].max() * clips.get(name, 1.0))
        # The smoothed fp32 weight exists only while this layer is quantized.
        weight = weight_out_in(module).detach().float() * scales[name][None, :] if name in scales else None
        replace_module(model, name, cls.from_float(module, weight, **kwargs))


@torch.no_grad()
def finish(
    model: nn.Module,
    config: QuantConfig,
    modules: tuple[str, ...],
    read_output: Callable[[], nn.Module | None] | None = None,
) -> nn.Module:
    """After the linear layers: the embeddings (``config.embeddings``), the untie, and the record
    of what was done in ``model.config.quantization_config``.

    ``read_output``, if given, fills the output projection (still on the meta device) once the input
    embedding is converted, so that the two float tables are never in memory together; it may instead
    return the projection already quantized weight-only (:class:`W8A16Linear`), read a block of rows at
    a time, which then takes its place.
    """
    read_output = read_output or (lambda: None)
    if config.embeddings == "int8":
        embedding_modules = _quantize_embeddings(model, read_output)
    else:
        read_output()
        embedding_modules = {}
    _untie_if_quantized(model)
    pre_scaled = tuple(m for m in modules if getattr(model.get_submodule(m), "smooth_inv", None) is not None)
    w8a16 = ()
    if config.scheme == "w8a8":
        w8a16 = tuple(m for m in modules if isinstance(model.get_submodule(m), W8A16Linear))
    record = QuantRecord(config, modules=modules, pre_scaled=pre_scaled, w8a16_modules=w8a16, **embedding_modules)
    model.config.quantization_config = record.to_dict()
    return model


def plan_embeddings(model: nn.Module) -> tuple[bool, bool, bool]:
    """``(input, output, tied)``: whether the input embedding and the output projection are to be
    stored int8 (see ``QuantConfig.embeddings``), and whether they share one table.

    A tied pair is converted whole or not at all, since one side alone would keep the float table and
    add an int8 copy; an output projection the scheme already quantized (``lm_head`` not excluded) is
    left as it is; and transformers reads a model's dtype and device from its parameters, so one
    float parameter must remain (OLMo's norms have no weights: its embeddings stay float).
    """
    inp, out = embeddings_of(model)
    in_ok = inp is not None and (isinstance(inp, Int8Embedding) or is_float_embedding(inp))
    out_ok = out is not None and is_float_linear(out) and not FLOAT_LINEARS[type(out).__name__].transposed
    tied = inp is not None and out is not None and _is_tied(model, out, inp)
    if tied and not (in_ok and out_ok):
        in_ok = out_ok = False
    converted = {id(m.weight) for m, ok in ((inp, in_ok), (out, out_ok)) if ok}
    if converted and not any(p.is_floating_point() and id(p) not in converted for p in model.parameters()):
        log.info("embeddings kept in float: they hold the model's only float parameters")
        in_ok = out_ok = False
    return in_ok, out_ok, tied


def quantize_input_embedding(model: nn.Module) -> str:
    """Replace the float input embedding by an :class:`Int8Embedding` (if not done yet); its name."""
    inp = embeddings_of(model)[0]
    name = next(n for n, m in model.named_modules() if m is inp)
    if not isinstance(inp, Int8Embedding):
        replace_module(model, name, Int8Embedding.from_float(inp))
    return name


def _quantize_embeddings(model: nn.Module, read_output: Callable[[], nn.Module | None]) -> dict:
    """Store the input and output embeddings int8 as :func:`plan_embeddings` decides: a tied pair as
    one int8 table, read by an :class:`Int8Embedding` and an :class:`Int8TiedHead` (weight-only).
    ``read_output`` fills the output projection after the input side is converted. Returns the
    :class:`QuantRecord` fields that record what was done.
    """
    in_ok, out_ok, tied = plan_embeddings(model)
    inp, out = embeddings_of(model)
    if inp is not None and not in_ok:
        log.info("input embedding %s kept in float", type(inp).__name__)
    inp = None  # the float table must be free to go once swapped out
    done = {"input_embedding": "", "output_embedding": "", "tied_embeddings": False}
    if in_ok:
        done["input_embedding"] = quantize_input_embedding(model)
    ready = read_output()
    if out_ok:
        name = next(n for n, m in model.named_modules() if m is out)
        if ready is not None:
            q_out = ready
        elif tied:
            q_in = embeddings_of(model)[0]
            q_out = Int8TiedHead(q_in, None if out.bias is None else out.bias.detach().clone())
            done["tied_embeddings"] = True
        else:
            q_out = W8A16Linear.from_float(out)
        replace_module(model, name, q_out)
        done["output_embedding"] = name
    log.info(
        "embeddings: input %s, output %s%s",
        done["input_embedding"] or "float",
        done["output_embedding"] or "float",
        " (one shared int8 table)" if done["tied_embeddings"] else "",
    )
    return done


def _is_tied(model: nn.Module, out: nn.Module, inp: nn.Module) -> bool:
    """Whether the output projection's weight is the input embedding's (tied weights)."""
    a, b = getattr(out, "weight", None), inp.weight
    if a is None or a.shape != b.shape:
        return False
    if a is b:
        return True
    if a.is_meta or b.is_meta:  # every meta tensor has data_ptr 0: go by the config
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return bool(getattr(config, "tie_word_embeddings", False))
    return a.data_ptr() == b.data_ptr()


def _untie_if_quantized(model: nn.Module) -> None:
    """If a tied output embedding was quantized, the saved config must no longer tie it.

    transformers ties parameters; a quantized pair is tied by :class:`Int8TiedHead` instead, which
    loading rebuilds from ``QuantRecord.tied_embeddings``.
    """
    out = embeddings_of(model)[1]
    if out is not None and not is_float_linear(out) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
