"""Layer-by-layer quantization: memory for about one decoder layer, not for the model.

:func:`quantize_layerwise` starts from a model *skeleton* (built on the meta device: modules and
shapes, no weights) and a function that reads one float tensor of the source checkpoint by name.
It materializes only what it is working on:

1. everything outside the decoder stack except the output projection (embeddings, position tables,
   the final norm), in fp32 (a plain embedding table in the checkpoint's dtype, its looked-up rows
   cast to fp32: the same values at half the memory);
2. the inputs of every decoder layer on the calibration samples, captured by running the model
   with each layer replaced by a stub that records the arguments it is called with (hidden states
   for the first layer; attention masks, position embeddings, ... for each layer, since some
   architectures give layers of different types different ones) and stops the forward at the last
   layer. No per-model code: whatever the model passes its layers is what they get here. Then the
   float parts go to the serving dtype, and an untied input embedding to int8 (written and freed
   at once);
3. for each layer in turn: read its weights (fp32), run the cached inputs through it while recording
   the activation abs-max of its linears (the statistics :func:`quantkit.calibrate` would record
   for them), cast it to the serving dtype, smooth and quantize its linears with
   :func:`quantkit.core.quantize.quantize_targets`, hand it to ``emit`` (which writes its tensors),
   run the inputs through the *quantized* layer to make the next layer's inputs (so later layers are
   calibrated on what they will really see; ``propagate="float"`` uses the float layer's outputs
   instead, which reproduces whole-model quantization bit for bit) and free it;
4. the output projection (from blocks of rows when ``read_rows`` is given and it is stored int8) and
   the embeddings, then the record (:func:`quantkit.core.quantize.finish`).

Schemes that need no statistics (W8A16, naive per-token W8A8) skip steps 2 and the forward passes
of 3: each layer is read, quantized, emitted and freed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..errors import QuantkitError
from .calibration import ActStats, recording_amax
from .modules import W8A16Linear, embeddings_of
from .quantize import (
    check_stats,
    finish,
    plan_embeddings,
    quantize_input_embedding,
    quantize_targets,
    select_targets,
)
from .search import (
    needs_search,
    recording,
    search_layer,
)
from .smoothquant import fold_pre_scales

log = logging.getLogger(__name__)

# emit(prefix, module): write the tensors of ``module`` (a decoder layer, or at the end the whole
# model, whose freed layers are on the meta device) under ``prefix``.
Emit = Callable[[str, nn.Module], None]


class _StopForward(Exception):
    """Raised by the last layer's stub: the rest of the model is not needed to capture inputs."""


class _Capture(nn.Module):
    """Stands in for decoder layer ``index`` while inputs are captured: records its call."""

    def __init__(self, index: int, calls: list[list[tuple[tuple, dict]]], last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, *args: Any, **kwargs: Any):
        self.calls[self.index].append((args, kwargs))
        if self.last:
            raise _StopForward
        return args[0]  # layers after the first only need their own keyword arguments


def decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: the :class:`~torch.nn.ModuleList` holding the most parameters."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None or best[0] == 0:
        raise QuantkitError(f"{type(model).__name__} has no stack of decoder layers to quantize layer by layer")
    return best[1], best[2]


def _materialize(
    module: nn.Module,
    prefix: str,
    read: Callable[[str], torch.Tensor],
    dtype: torch.dtype | None,
    skip: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
) -> None:
    """Fill ``module``'s meta parameters and buffers from the source onto ``device`` (floats cast to
    ``dtype``; None keeps the checkpoint's), except those whose names start with one of ``skip``."""
    state = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t is None or not t.is_meta or name.startswith(skip):
            continue
        try:
            src = read(f"{prefix}{name}")
        except KeyError:
            raise QuantkitError(
                f"{prefix}{name} is missing from the checkpoint; it is incomplete or not this model's"
            ) from None
        if tuple(src.shape) != tuple(t.shape):
            raise QuantkitError(
                f"{prefix}{name} has shape {list(src.shape)} in the checkpoint but {list(t.shape)} in the model"
            )
        cast = src.is_floating_point() and dtype is not None
        state[name] = src.to(device=device, dtype=dtype if cast else src.dtype)
    if state:
        module.load_state_dict(state, strict=False, assign=True)


def _output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture_inputs(model: nn.Module, stack: nn.ModuleList, samples: torch.Tensor) -> list[list[tuple[tuple, dict]]]:
    """For every layer, the ``(args, kwargs)`` it is called with on each sample (see module docstring)."""
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in stack]
    layers = list(stack)
    for i in range(len(stack)):
        stack[i] = _Capture(i, calls, last=i == len(stack) - 1)
    try:
        for row in samples:
            try:
                model(input_ids=row[None, :], use_cache=False)
            except _StopForward:
                pass
            else:
                raise QuantkitError(f"{type(model).__name__} did not call its last decoder layer; cannot quantize it")
    finally:
        for i, layer in enumerate(layers):
            stack[i] = layer
    if any(len(c) != len(samples) for c in calls):
        raise QuantkitError(f"{type(model).__name__} does not call each decoder layer once per forward")
    return calls


@torch.no_grad()
def quantize_layerwise(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    config: QuantConfig,
    *,
    samples: torch.Tensor | None = None,
    stats: ActStats | None = None,
    dtype: torch.dtype = torch.bfloat16,
    emit: Emit,
    propagate: str = "quantized",
    fold_producers: bool = False,
    read_rows: Callable[[str, int, int], torch.Tensor] | None = None,
    w8a16: set[str] | frozenset[str] = frozenset(),
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Quantize the float checkpoint behind ``read`` into ``model``'s skeleton, one decoder layer at a time.

    Args:
        model: the model built on the meta device (e.g. ``from_config`` under accelerate's
            ``init_empty_weights(include_buffers=False)``: non-persistent buffers such as rotary
            tables are real, everything else is meta).
        read: returns the source tensor of a state-dict name (fresh memory; any float dtype).
        config: what to do, as for :func:`quantkit.quantize`.
        samples: ``[n, seq_len]`` calibration token ids; needed when ``config.needs_calibration``
            and ``stats`` is None.
        stats: statistics recorded beforehand (``quantkit calibrate``) instead of ``samples``: each
            layer then uses them as they are (no forward passes, no propagation).
        dtype: the serving dtype of the float parts (as ``model.to(dtype)`` before ``quantize``).
        emit: receives each finished decoder layer with its prefix (``"model.layers.3."``), then the
            whole model with prefix ``""`` (its freed layers on the meta device: skip meta tensors).
        propagate: ``"quantized"`` (default) or ``"float"``: which outputs feed the next layer.
        fold_producers: move run-time pre-scales into producing layers
            (:func:`quantkit.core.smoothquant.fold_pre_scales`, for the compressed-tensors export).
        read_rows: ``read_rows(name, start, stop)`` returns rows ``start:stop`` of a source tensor; with
            it an untied output projection stored int8 is quantized from blocks of rows as they are
            read, never whole in memory in float (it is as large as the embedding table).
        w8a16: with a W8A8 config, layers to store W8A16 instead (:func:`choose_w8a16_layers`).
        device: where each layer is materialized, calibrated and quantized (``emit`` receives it
            there); the calibration activations live there too.

    Returns:
        ``model``: its embeddings and other non-layer modules real (but an untied int8 input
        embedding, written by ``emit`` and freed before the layers), its layers freed (meta), and
        ``model.config.quantization_config`` the record, as :func:`quantkit.quantize` leaves it.
    """
    if propagate not in ("quantized", "float"):
        raise ValueError(f"propagate must be 'quantized' or 'float', not {propagate!r}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise QuantkitError("this model is already quantized; start from the float model")
    model.eval()  # no dropout while calibrating
    targets = select_targets(model, config)
    names = tuple(targets)
    stack_name, stack = decoder_stack(model)
    calibrate = config.needs_calibration and stats is None
    if calibrate and samples is None:
        raise QuantkitError(f"{config.label} needs calibration samples or statistics")
    if stats is not None:
        check_stats(targets, stats, config)
    search = needs_search(config) and calibrate
    if needs_search(config) and not search:
        log.warning("static activation scales from saved statistics: the calibration abs-max, no clipping search")
    # Calibration runs in fp32 (statistics not rounded to bf16); without it, read straight into dtype.
    work_dtype = torch.float32 if calibrate else dtype
    t0 = time.perf_counter()

    # 1. Everything outside the stack except the output projection (read last). A plain embedding
    # table is kept in the checkpoint's dtype and its rows cast to fp32 as they are looked up: the
    # same fp32 values as an fp32 table (a lookup copies values), at half the memory for bf16.
    head = embeddings_of(model)[1]
    head_prefix = _module_prefix(model, head) if head is not None else None
    _materialize_outside(model, read, stack_name, head_prefix, work_dtype, device, lookup=calibrate)

    # 2. Each layer's inputs on the calibration samples; then the float parts in the serving dtype.
    calls = _capture_fp32(model, stack, samples, device) if calibrate else None
    hidden = [args[0] for args, _ in calls[0]] if calls else None
    model.to(dtype)  # the layers are still on the meta device
    if config.embeddings == "int8" and head is not None and head.weight.is_meta:  # untied: convert it now
        if plan_embeddings(model)[0]:  # (a tied table waits for its head)
            # Written and freed at once: nothing after the capture reads it, and held through the
            # stack it would count in the peak of every layer.
            name = quantize_input_embedding(model)
            emit(f"{name}.", model.get_submodule(name))
            model.get_submodule(name).to("meta")

    # 3. Layer by layer.
    bar = tqdm(range(len(stack)), desc=f"Quantizing {config.label}", unit="layer", disable=not progress)
    for i in bar:
        layer, prefix = stack[i], f"{stack_name}.{i}."
        # Popped: once swapped out, the float modules must not stay alive through this dict.
        layer_targets = {n: targets.pop(n) for n in [n for n in targets if n.startswith(prefix)]}
        _materialize(layer, prefix, read, work_dtype, device=device)
        layer_stats = None if stats is None else {n: stats[n].to(device) for n in layer_targets if n in stats}
        clips = {}
        if calibrate:
            keep = recording(model, layer_targets) if search else contextlib.nullcontext()
            with recording_amax(layer_targets) as layer_stats, keep as recorded:
                _forward(layer, hidden, calls[i], update=propagate == "float")
            layer_stats = {n: a.to(device) for n, a in layer_stats.items()}
            if search:  # on the fp32 layer, before it goes to the serving dtype
                clips = search_layer(model, layer_targets, recorded, layer_stats, config, prescale_all=fold_producers)
            recorded = None
        layer.to(dtype)
        check_stats(layer_targets, layer_stats, config)
        if fold_producers and layer_stats is not None:
            layer_stats, _ = fold_pre_scales(model, layer_targets, layer_stats, config)
        quantize_targets(model, layer_targets, layer_stats, config, clips=clips, w8a16=w8a16)
        layer_targets.clear()  # the float modules it swapped out
        emit(prefix, layer)  # may adjust the layer for its format (e.g. round scales): before propagating
        if calibrate:
            if propagate == "quantized":
                # Written already: its float parts (the served bf16 values) go back to fp32 to run on the
                # fp32 activations (LayerNorm refuses mixed dtypes); int8 weights and scales stay.
                _forward(layer.float(), hidden, calls[i], update=True)
            calls[i] = None
        layer.to("meta")  # free it
        bar.set_postfix_str(f"{(time.perf_counter() - t0) / (i + 1):.1f} s/layer")

    # 4. The output projection, the float parts in the serving dtype, the embeddings, the record.
    calls = hidden = None  # the calibration activations are done with

    def read_output() -> nn.Module | None:  # after the input embedding is converted: one table at a time
        if head_prefix is None:
            return None
        out = model.get_submodule(head_prefix[:-1])
        if not out.weight.is_meta:  # tied: it is the input embedding
            return None
        blockwise = read_rows is not None and config.embeddings == "int8" and plan_embeddings(model)[1]
        if blockwise and type(out) is nn.Linear and out.bias is None:
            name = f"{head_prefix}weight"
            rows = lambda a, b: read_rows(name, a, b).to(device=device, dtype=dtype)  # noqa: E731
            return W8A16Linear.from_rows(tuple(out.weight.shape), rows, dtype).to(device)
        _materialize(out, head_prefix, read, dtype, device=device)
        return None

    head = None  # the float table must go as soon as finish() has swapped it out
    finish(model, config, names, read_output)
    emit("", model)
    log.info("quantized %d layers in %.1f s", len(stack), time.perf_counter() - t0)
    return model


@torch.no_grad()
def collect_stats_layerwise(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    config: QuantConfig,
    samples: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ActStats:
    """The activation statistics :func:`quantkit.calibrate` records on the float model in fp32, for
    the layers ``config`` quantizes, with one decoder layer in memory at a time (what ``quantkit
    calibrate`` saves): the same values bit for bit. ``model`` is a skeleton, as for
    :func:`quantize_layerwise`; it is left with its layers freed."""
    model.eval()
    targets = select_targets(model, config)
    stack_name, stack = decoder_stack(model)
    outside = [n for n in targets if not n.startswith(f"{stack_name}.")]
    if outside:
        raise QuantkitError(f"layer-by-layer calibration covers the decoder layers only, not {outside[0]}")
    head = embeddings_of(model)[1]
    head_prefix = _module_prefix(model, head) if head is not None else None
    _materialize_outside(model, read, stack_name, head_prefix, torch.float32, device, lookup=True)
    calls = _capture_fp32(model, stack, samples, device)
    hidden = [args[0] for args, _ in calls[0]]
    stats: ActStats = {}
    for i in tqdm(range(len(stack)), desc="Calibrating", unit="layer", disable=not progress):
        layer, prefix = stack[i], f"{stack_name}.{i}."
        _materialize(layer, prefix, read, torch.float32, device=device)
        with recording_amax({n: m for n, m in targets.items() if n.startswith(prefix)}) as layer_stats:
            _forward(layer, hidden, calls[i], update=True)
        stats.update(layer_stats)
        calls[i] = None
        layer.to("meta")
    return stats


def _materialize_outside(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    stack_name: str,
    head_prefix: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    lookup: bool,
) -> None:
    """Everything outside the decoder stack except the output projection. With ``lookup``, a plain
    embedding table is kept in the checkpoint's dtype and its rows cast to fp32 as they are looked up
    (:func:`_capture_fp32`): the same fp32 values as an fp32 table, at half the memory for bf16."""
    inp = embeddings_of(model)[0]
    skip = (f"{stack_name}.", *((head_prefix,) if head_prefix else ()))
    if lookup and inp is not None and type(inp) is nn.Embedding:
        _materialize(inp, _module_prefix(model, inp), read, None, device=device)
    _materialize(model, "", read, dtype, skip=skip, device=device)
    _move_real_tensors(model, device)  # the non-persistent buffers (rotary tables) built with the skeleton
    _retie(model)


def _capture_fp32(
    model: nn.Module, stack: nn.ModuleList, samples: torch.Tensor, device: torch.device | str
) -> list[list[tuple[tuple, dict]]]:
    """:func:`_capture_inputs`, with a plain embedding's looked-up rows cast to fp32."""
    inp = embeddings_of(model)[0]
    plain = inp is not None and type(inp) is nn.Embedding and inp.weight.dtype != torch.float32
    hook = inp.register_forward_hook(lambda _m, _a, out: out.float()) if plain else None
    try:
        return _capture_inputs(model, stack, samples.to(device))
    finally:
        if hook is not None:
            hook.remove()


def _forward(layer: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]], *, update: bool) -> None:
    """Run ``layer`` on each sample's inputs; with ``update``, its outputs replace them (in place, so
    that one set of activations is held, not two)."""
    for j, (args, kwargs) in enumerate(calls):
        out = _output(layer(hidden[j], *args[1:], **kwargs))
        if update:
            hidden[j] = out


def _move_real_tensors(model: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not on the meta device to ``device`` (``Module.to``
    cannot: it refuses meta tensors)."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and not t.is_meta and t.device != torch.device(device):
                    moved = t.to(device)
                    table[name] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved


def _module_prefix(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise QuantkitError("output projection not found in the model")


def _retie(model: nn.Module) -> None:
    """Tie the output projection to the input embedding again where the config ties them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
