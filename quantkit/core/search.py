"""Static activation scales chosen on calibration data, and the alpha grid of ``alpha="auto"``.

The abs-max of a layer's input over the calibration text is a poor static (per-tensor) scale: one
outlier token sets it, and every other token then rounds to a handful of int8 levels. Here the scale
is chosen per *smoothing group* (a norm and the linears that read it, or one layer on its own) as a
clipping ratio of that abs-max (:data:`CLIP_GRID`), the one whose quantized outputs are closest to
the float outputs on the group's real calibration inputs:

    error(group) = sum over tokens and outputs of |Y_float - Y_int8|^2 / sum |Y_float|^2

A group of several linears is judged by the output of the module holding them (the attention block
for q/k/v, the MLP for gate/up), a single linear by its own output. The total, not a per-token
average, is minimized: the first tokens of a window carry activations a hundred times the others
(the attention sink every later token reads), and clipping them costs far more than their share of
tokens (measured: a per-token average chose clips that took the default model to +55 % perplexity).
``Y_int8`` comes from the module quantkit will serve (:class:`~.modules.W8A8Linear`, its int8
kernels), so the error measured is the checkpoint's, rounding included.

Layer inputs are recorded by :func:`recording` while the layer-by-layer pipeline runs its
calibration forward (:mod:`.sequential`): the search costs no extra pass over the model.

``alpha="auto"`` is not chosen here but on the whole model's calibration loss
(:func:`quantkit.core.probe.calibration_losses`): choosing alpha per group by the same output
error was built and measured no better than a fixed 0.5 on the default model (+0.99 % to +1.15 %
against +1.07 % perplexity; 0.65 everywhere gives +0.68 %): a group's output error does not rank
alphas the way the model's loss does.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from ..config import QuantConfig
from ..qmath import abs_max_scale
from .calibration import ActStats
from .modules import W8A8Linear, replace_module, weight_out_in
from .smoothquant import smoothing_groups, smoothing_scale, weight_amax

log = logging.getLogger(__name__)

# Migration strengths alpha="auto" tries (published per-model alphas run from 0.5 to 0.85), and the
# calibration samples it judges them on (every other one: half the cost, all parts of the text).
ALPHA_GRID = tuple(round(0.40 + 0.05 * i, 2) for i in range(11))
ALPHA_SAMPLE_STRIDE = 2
# With static activations each candidate also searches its clipping: fewer candidates.
ALPHA_GRID_STATIC = (0.5, 0.65, 0.8, 0.9)
# Fractions of the calibration abs-max tried as the static activation range.
CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05)
# Calibration tokens per layer input kept for the search (whole samples, so the first positions of a
# window, where the largest activations sit, are always among them).
SEARCH_TOKENS = 4096


def needs_search(config: QuantConfig) -> bool:
    """Whether ``config`` has static activation scales to choose on calibration activations."""
    return config.scheme == "w8a8" and config.activations == "per_tensor"


def group_parent(names: list[str]) -> str:
    """The innermost module holding every linear of a group (e.g. ``model.layers.3.self_attn``)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):  # names of any depths
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if len(common) == len(parts[0]):  # one linear: its own parent module
        common = common[:-1]
    return ".".join(common)


class Recorded(NamedTuple):
    """What :func:`recording` keeps of a layer's calibration forward for the search."""

    inputs: dict[str, list[torch.Tensor]]  # per linear: ``[tokens, in]`` fp32 rows, one entry per call
    calls: dict[str, list[tuple[tuple, dict]]]  # per parent module: the (args, kwargs) it was called with


@contextlib.contextmanager
def recording(model: nn.Module, modules: dict[str, nn.Module], max_tokens: int = SEARCH_TOKENS) -> Iterator[Recorded]:
    """Inside the block, the inputs of each linear in ``modules`` and the calls of the modules that
    hold several of them (see :func:`group_parent`) are kept until ``max_tokens`` tokens are held.
    Linears that read the same tensor share it."""
    # the direct parents of two or more of them (the attention block, the MLP): what group_parent gives
    counts = collections.Counter(n.rpartition(".")[0] for n in modules)
    parents = {p: model.get_submodule(p) for p, c in counts.items() if p and c > 1}
    kept = Recorded({n: [] for n in modules}, {p: [] for p in parents})
    held: dict[str, int] = dict.fromkeys([*modules, *parents], 0)

    def input_hook(name: str):
        def hook(_module, args):
            if held[name] < max_tokens:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])[: max_tokens - held[name]]
                kept.inputs[name].append(x if x.dtype == torch.float32 else x.float())
                held[name] += x.shape[0]

        return hook

    def call_hook(name: str):
        def hook(_module, args, kwargs):
            if held[name] < max_tokens:
                first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
                kept.calls[name].append((args, kwargs))
                held[name] += first.numel() // first.shape[-1]

        return hook

    handles = [m.register_forward_pre_hook(input_hook(n)) for n, m in modules.items()]
    handles += [m.register_forward_pre_hook(call_hook(n), with_kwargs=True) for n, m in parents.items()]
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def search_layer(
    model: nn.Module,
    targets: dict[str, nn.Module],
    recorded: Recorded,
    stats: ActStats,
    config: QuantConfig,
    *,
    prescale_all: bool = False,
) -> dict[str, float]:
    """The clipping ratio of the static activation scale of each linear of ``targets`` (e.g. one
    decoder layer's), searched per smoothing group at ``config.alpha`` (a number).

    ``recorded`` holds the layer's calibration inputs (:func:`recording`), ``stats`` their full
    calibration abs-max (before smoothing). ``prescale_all`` treats every target outside a norm group
    as pre-scaled (the compressed-tensors export folds those scales into producing layers even though
    its config turns the run-time fallback off). The float model is left as it was.
    """
    groups: list[tuple[list[str], bool]] = []  # (linears sharing an input, smoothed)
    if config.smoothing == "smoothquant":
        fallback = config.fallback_smoothing or prescale_all
        groups = [(names, True) for _, names in smoothing_groups(model, targets, stats, fallback=fallback)]
    grouped = {n for names, _ in groups for n in names}
    groups += [([n], False) for n in targets if n not in grouped and n in stats]
    modules = dict(model.named_modules())
    clips: dict[str, float] = {}
    for names, smoothed in groups:
        present = [n for n in names if n in targets and recorded.inputs.get(n)]
        if not present:
            continue
        parent = group_parent(present) if len(present) > 1 else None
        group = _Group(
            model,
            present,
            torch.cat(recorded.inputs[present[0]]),
            [modules[n] for n in names],  # every linear reading the input counts in the weight max
            torch.stack([stats[n] for n in names if n in stats]).amax(dim=0),
            (parent, recorded.calls[parent]) if parent in recorded.calls else None,
        )
        clips.update(dict.fromkeys(present, group.best_clip(config.alpha if smoothed else None)))
    return clips


class _Group:
    """The linears ``names`` of ``model``, which read ``x``, and how to measure their error."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        x: torch.Tensor,
        members: list[nn.Module],
        act_amax: torch.Tensor,
        parent: tuple[str, list[tuple[tuple, dict]]] | None,
    ) -> None:
        self.model, self.names, self.act_amax, self.parent = model, names, act_amax, parent
        self.x = x.to(act_amax.device)
        self.linears = [model.get_submodule(n) for n in names]
        self.weights = [weight_out_in(m).detach().float() for m in self.linears]
        self.w_amax = torch.stack([weight_amax(m) for m in members]).amax(dim=0)
        self.reference = self._outputs()
        self.energy = [max(float(r.pow(2).sum()), 1e-30) for r in self.reference]

    def _outputs(self) -> list[torch.Tensor]:
        """With the model's current modules: the parent's outputs on its calls, or each linear's on ``x``."""
        if self.parent is None:
            return [self.model.get_submodule(n)(self.x).float() for n in self.names]
        module = self.model.get_submodule(self.parent[0])
        return [_first(module(*args, **kwargs)).float() for args, kwargs in self.parent[1]]

    def error(self, alpha: float | None, clip: float) -> float:
        """The relative squared error of the outputs with the group quantized (see the module docstring)."""
        s = None if alpha is None else smoothing_scale(self.act_amax, self.w_amax, alpha)
        for name, lin, w in zip(self.names, self.linears, self.weights, strict=True):
            replace_module(self.model, name, _quantized(lin, w, s, self.act_amax, clip))
        try:
            outputs = self._outputs()
        finally:
            for name, lin in zip(self.names, self.linears, strict=True):
                replace_module(self.model, name, lin)
        return sum(
            float((o - r).pow(2).sum()) / e for o, r, e in zip(outputs, self.reference, self.energy, strict=True)
        )

    def best_clip(self, alpha: float | None) -> float:
        errors = {c: self.error(alpha, c) for c in CLIP_GRID}
        return min(errors, key=errors.get)


def _first(out):
    """A module's main output (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _quantized(
    linear: nn.Module, w: torch.Tensor, s: torch.Tensor | None, act_amax: torch.Tensor, clip: float | None
) -> W8A8Linear:
    """``linear`` as quantkit would serve it: smoothed by ``s`` (as a run-time pre-scale, which is the
    same function as a folded one) and with a static scale of ``clip`` times the smoothed abs-max."""
    input_scale = None
    if clip is not None:
        amax = act_amax if s is None else act_amax / s
        input_scale = abs_max_scale(amax.max() * clip)
    return W8A8Linear.from_float(
        linear, w if s is None else w * s[None, :], smooth_inv=None if s is None else 1.0 / s, input_scale=input_scale
    )
