"""Measuring whole quantized models on calibration text, layer by layer: what ``alpha="auto"`` and
``--max-drift`` decide by.

:func:`calibration_losses` reads each decoder layer once (as :mod:`.sequential` does, memory for
about one layer) and quantizes it once per :class:`Candidate`; each candidate's activations flow
through its own quantized layers, and at the end the model's own head turns every stream into a
next-token loss on the calibration samples. So each candidate is judged as a whole quantized model,
not by a layer's local error, in one pass over the checkpoint. :func:`choose_alpha` and
:func:`choose_w8a16_layers` pick from those losses; the pipeline then quantizes for real with the
choice (:func:`quantkit.evaluation.pipeline.quantize_to_disk`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from .calibration import ActStats, recording_amax
from .modules import embeddings_of
from .quantize import check_stats, quantize_targets, select_targets
from .search import (
    ALPHA_GRID,
    ALPHA_GRID_STATIC,
    ALPHA_SAMPLE_STRIDE,
    SEARCH_TOKENS,
    needs_search,
    recording,
    search_layer,
)
from .sequential import (
    _capture_fp32,
    _forward,
    _materialize,
    _materialize_outside,
    _module_prefix,
    _output,
    decoder_stack,
)

log = logging.getLogger(__name__)


class Candidate(NamedTuple):
    """One way to quantize the model that :func:`calibration_losses` measures."""

    config: QuantConfig  # a fixed alpha
    max_error: float = math.inf  # layers whose W8A8 output error exceeds it are stored W8A16


class AlphaSearch(NamedTuple):
    """What ``alpha="auto"`` chose (:func:`choose_alpha`), as recorded in the checkpoint."""

    chosen: float
    alphas: tuple[float, ...]
    losses: tuple[float, ...]  # mean next-token loss on the calibration samples, per candidate
    float_loss: float
    tokens: int

    def to_record(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "alphas": list(self.alphas),
            "calibration_loss": [round(v, 6) for v in self.losses],
            "float_loss": round(self.float_loss, 6),
            "tokens": self.tokens,
        }


def choose_alpha(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    config: QuantConfig,
    samples: torch.Tensor,
    *,
    alphas: tuple[float, ...] | None = None,
    stride: int = ALPHA_SAMPLE_STRIDE,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> AlphaSearch:
    """The SmoothQuant migration strength among ``alphas`` whose quantized model has the lowest
    next-token loss on every ``stride``-th calibration sample (:func:`calibration_losses`). By default
    :data:`~quantkit.core.search.ALPHA_GRID`, or the shorter ``ALPHA_GRID_STATIC`` with static
    activations (each candidate then searches its clipping too)."""
    if alphas is None:
        alphas = ALPHA_GRID_STATIC if needs_search(config) else ALPHA_GRID
    samples = samples[::stride]
    candidates = [Candidate(dataclasses.replace(config, alpha=a, max_drift=None)) for a in alphas]
    float_loss, losses, _ = calibration_losses(
        model, read, candidates, samples, device=device, progress=progress, desc="Trying alphas"
    )
    best = min(range(len(alphas)), key=losses.__getitem__)
    tokens = samples.shape[0] * (samples.shape[1] - 1)
    log.info(
        "alpha auto: %s on %d calibration tokens (float loss %.4f; %s)",
        alphas[best],
        tokens,
        float_loss,
        ", ".join(f"{a:g}: {v:.4f}" for a, v in zip(alphas, losses, strict=True)),
    )
    return AlphaSearch(alphas[best], tuple(alphas), tuple(losses), float_loss, tokens)


# Output-error thresholds (|Y_int8 - Y_float|^2 / |Y_float|^2 of a layer, W8A8) that --max-drift tries:
# the layers above a threshold are kept W8A16. inf: every layer W8A8; 0: every layer W8A16.
ERROR_THRESHOLDS = (math.inf, 3e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 2e-4, 0.0)


def choose_w8a16_layers(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    config: QuantConfig,
    samples: torch.Tensor,
    *,
    thresholds: tuple[float, ...] = ERROR_THRESHOLDS,
    stride: int = ALPHA_SAMPLE_STRIDE,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[set[str], dict[str, Any]]:
    """The fewest layers to keep in W8A16 for ``config.max_drift``, and the search as recorded.

    Each layer's sensitivity is the output error of its W8A8 form on the float model's calibration
    inputs. For each threshold, the model with every layer above it kept W8A16 is measured whole on
    every ``stride``-th calibration sample (:func:`calibration_losses`); the candidate with the most
    W8A8 layers whose calibration perplexity is within ``max_drift`` % of the float model's is kept
    (if none is, even all-W8A16, that one, with a warning). The drift is measured on the calibration
    text, so on other text it is an estimate.
    """
    budget = config.max_drift
    base = dataclasses.replace(config, max_drift=None)
    samples = samples[::stride]
    candidates = [Candidate(base, t) for t in thresholds]
    float_loss, losses, errors = calibration_losses(
        model, read, candidates, samples, device=device, progress=progress, desc="Measuring layers"
    )
    drifts = [100 * (math.exp(v - float_loss) - 1) for v in losses]
    kept = [sorted(n for n, e in errors.items() if e > t) for t in thresholds]
    within = [k for k, d in enumerate(drifts) if d <= budget]
    chosen = min(within, key=lambda k: len(kept[k])) if within else len(thresholds) - 1
    if not within:
        log.warning(
            "no candidate meets --max-drift %g%% on the calibration text (all-W8A16 gives %.2f%%): keeping every "
            "layer W8A16",
            budget,
            drifts[-1],
        )
    log.info(
        "max-drift %g%%: %d of %d layers kept W8A16, calibration drift %.2f%% (%s)",
        budget,
        len(kept[chosen]),
        len(errors),
        drifts[chosen],
        ", ".join(f"{len(k)} W8A16: {d:.2f}%" for k, d in zip(kept, drifts, strict=True)),
    )
    record = {
        "max_drift": budget,
        "thresholds": [t if math.isfinite(t) else "inf" for t in thresholds],
        "w8a16_layers": [len(k) for k in kept],
        "calibration_drift_pct": [round(d, 4) for d in drifts],
        "chosen": chosen,
        "tokens": samples.shape[0] * (samples.shape[1] - 1),
    }
    return set(kept[chosen]), record


@torch.no_grad()
def calibration_losses(
    model: nn.Module,
    read: Callable[[str], torch.Tensor],
    candidates: list[Candidate],
    samples: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "Measuring",
) -> tuple[float, list[float], dict[str, float]]:
    """The mean next-token loss on ``samples`` of the float model and of the model quantized as
    each candidate says, one decoder layer in memory at a time; and, where a candidate keeps layers
    W8A16 by their error, each layer's W8A8 output error.

    The layers are read once; each is quantized once per candidate (from a copy of the float layer,
    with the statistics the float model's inputs give it: what differs between candidates is the
    quantization, not the calibration), and each candidate's activations flow through its own
    quantized layers, so every loss is that of a whole quantized model. Then the model's own head
    (final norm, output projection in the checkpoint's dtype) turns each stream into logits. A
    layer's error is ``|Y_int8 - Y_float|^2 / |Y_float|^2`` of its output with the whole decoder
    layer in W8A8, on the float inputs. ``model`` is a skeleton, as for :func:`quantize_layerwise`;
    use a copy: its modules are left changed.
    """
    model.eval()
    names = tuple(select_targets(model, candidates[0].config))
    stack_name, stack = decoder_stack(model)
    head = embeddings_of(model)[1]
    head_prefix = _module_prefix(model, head) if head is not None else None
    _materialize_outside(model, read, stack_name, head_prefix, torch.float32, device, lookup=True)
    calls = _capture_fp32(model, stack, samples, device)
    float_stream = [args[0] for args, _ in calls[0]]
    streams = [[h.clone() for h in float_stream] for _ in candidates]
    search = any(needs_search(c.config) for c in candidates)
    sensitivity = any(math.isfinite(c.max_error) for c in candidates)
    errors: dict[str, float] = {}
    as_tuple = False
    for i in tqdm(range(len(stack)), desc=desc, unit="layer", disable=not progress):
        layer, prefix = stack[i], f"{stack_name}.{i}."
        _materialize(layer, prefix, read, torch.float32, device=device)
        layer_targets = {n: model.get_submodule(n) for n in names if n.startswith(prefix)}
        keep = recording(model, layer_targets) if search else contextlib.nullcontext()
        outs = _recording_outputs(layer_targets) if sensitivity else contextlib.nullcontext()
        inputs = list(float_stream)
        with recording_amax(layer_targets) as stats, keep as recorded, outs as float_outputs:
            for j, (args, kwargs) in enumerate(calls[i]):
                out = layer(float_stream[j], *args[1:], **kwargs)
                as_tuple = isinstance(out, (tuple, list))
                float_stream[j] = _output(out)
        stats = {n: a.to(device) for n, a in stats.items()}

        if sensitivity:  # each linear's error in the W8A8 layer, on the float inputs
            q = _quantized_copy(model, stack, i, layer, list(layer_targets), stats, recorded, candidates[0].config)
            with _recording_outputs({n: q.get_submodule(n[len(prefix) :]) for n in layer_targets}) as q_outputs:
                _forward(q, inputs, calls[i], update=False)
            for n in layer_targets:
                ref, got = torch.cat(float_outputs[n]), torch.cat(q_outputs[n])
                errors[n] = float((got - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
            q_outputs = float_outputs = None
        for cand, stream in zip(candidates, streams, strict=True):
            w8a16 = {n for n in layer_targets if errors.get(n, 0.0) > cand.max_error}
            q = _quantized_copy(model, stack, i, layer, list(layer_targets), stats, recorded, cand.config, w8a16)
            _forward(q, stream, calls[i], update=True)
        stack[i] = layer
        layer.to("meta")
        calls[i] = recorded = inputs = None

    if head_prefix is not None and model.get_submodule(head_prefix[:-1]).weight.is_meta:  # untied
        _materialize(model.get_submodule(head_prefix[:-1]), head_prefix, read, None, device=device)
    losses = [_stream_loss(model, stack, s, samples, as_tuple, device) for s in (float_stream, *streams)]
    return losses[0], losses[1:], errors


def _quantized_copy(
    model: nn.Module,
    stack: nn.ModuleList,
    i: int,
    layer: nn.Module,
    names: list[str],
    stats: ActStats,
    recorded: Any,
    config: QuantConfig,
    w8a16: set[str] | frozenset[str] = frozenset(),
) -> nn.Module:
    """A copy of the float decoder layer ``i``, quantized with ``config``, put in the stack's slot."""
    stack[i] = copy.deepcopy(layer)
    targets = {n: model.get_submodule(n) for n in names}
    check_stats(targets, stats, config)
    clips = search_layer(model, targets, recorded, stats, config) if needs_search(config) else {}
    quantize_targets(model, targets, stats, config, clips=clips, w8a16=w8a16)
    return stack[i]


@contextlib.contextmanager
def _recording_outputs(modules: dict[str, nn.Module], max_tokens: int = SEARCH_TOKENS):
    """Inside the block, the outputs (``[tokens, out]`` fp32) of each module, up to ``max_tokens`` rows."""
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    held = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        def hook(_module, _args, out):
            if held[name] < max_tokens:
                y = out.detach().reshape(-1, out.shape[-1])[: max_tokens - held[name]].float()
                kept[name].append(y)
                held[name] += y.shape[0]

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns the recorded output of the stack for the current sample."""

    def __init__(self, outputs: list[torch.Tensor], as_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.as_tuple, self.sample = outputs, as_tuple, 0

    def forward(self, *args: Any, **kwargs: Any):
        h = self.outputs[self.sample]
        return (h,) if self.as_tuple else h


def _stream_loss(
    model: nn.Module,
    stack: nn.ModuleList,
    outputs: list[torch.Tensor],
    samples: torch.Tensor,
    as_tuple: bool,
    device: torch.device | str,
) -> float:
    """Mean next-token loss of ``samples`` given the stack's outputs on them, through the model's head."""
    layers = list(stack)
    replay = _Replay(outputs, as_tuple)
    head = embeddings_of(model)[1]
    hook = head.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
    total, count = 0.0, 0
    try:
        for k in range(len(stack)):
            stack[k] = replay
        for j, ids in enumerate(samples):
            replay.sample = j
            ids = ids.to(device)
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += ids.numel() - 1
    finally:
        hook.remove()
        for k, layer in enumerate(layers):
            stack[k] = layer
    return total / count
