"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a linear layer ``y = x W^T`` and a positive per-input-channel vector ``s``,
``y = (x / s) (W * s)^T``: the float function is unchanged while the activation range per channel
shrinks by ``s`` and the weight's grows. With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

both sides end up with comparable per-channel ranges, so both quantize well (Xiao et al., 2023).
``max|W_j|`` is over every row of every linear reading that input.

Where a norm feeds the linears, ``1/s`` is folded into the norm's weight (and bias) so it costs
nothing at run time (:func:`apply_smoothquant`). Elsewhere the ``1/s`` multiply stays in the
quantized module (``smooth_inv``), or, where the input is linear in each output row of an earlier
layer, :func:`fold_pre_scales` moves it into that layer's rows (the compressed-tensors export).
Which norm feeds which linears, and which layer produces which input, is :mod:`.arch`'s table.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import QuantkitError
from . import arch
from .calibration import ActStats
from .modules import FLOAT_LINEARS, is_float_linear, weight_out_in

log = logging.getLogger(__name__)

# Keeps s away from 0 and inf when a channel's activation or weight max is (near) zero.
_MIN = 1e-5


def smoothing_scale(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` (fp32 ``[in]``) from activation and weight per-input-channel abs-max."""
    a = act_amax.float().clamp_min(_MIN)
    w = weight_amax.float().clamp_min(_MIN)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(_MIN)
    # A channel that never fired (all-zero activation) or has all-zero weights carries no signal
    # to balance: leave it unscaled rather than blowing up the other side.
    dead = (act_amax <= 0) | (weight_amax <= 0)
    return torch.where(dead, torch.ones_like(s), s)


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the norm's output channels by ``s``: ``(offset + w') = (offset + w) / s``."""
    w = norm.weight
    w.copy_(((w.float() + offset) / s - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


class Smoothed(NamedTuple):
    """What :func:`apply_smoothquant` leaves for quantization to apply."""

    # Per target whose weight must be smoothed: s (fp32 [in]); its input columns are multiplied by it.
    scales: dict[str, torch.Tensor]
    # Per target that keeps a run-time pre-scale: 1/s.
    smooth_inv: dict[str, torch.Tensor]
    # The statistics of the smoothed activations (amax / s); a new dict.
    stats: ActStats


def smoothing_groups(
    model: nn.Module, targets: dict[str, nn.Module], stats: ActStats, *, fallback: bool
) -> list[tuple[str | None, list[str]]]:
    """``(norm, linears)`` for every group :func:`apply_smoothquant` smooths with one ``s``: the norm
    groups of :func:`quantkit.core.arch.smooth_groups` whose linears are float and have statistics,
    then (with ``fallback``) each other target with statistics alone, with norm None (a run-time
    pre-scale)."""
    modules = dict(model.named_modules())
    groups: list[tuple[str | None, list[str]]] = []
    covered: set[str] = set()
    for norm_name, linear_names in arch.smooth_groups(model):
        if any(n in stats for n in linear_names) and all(is_float_linear(modules[n]) for n in linear_names):
            groups.append((norm_name, linear_names))
            covered.update(linear_names)
    if fallback:
        groups += [(None, [n]) for n in targets if n not in covered and n in stats]
    return groups


def _alpha(config: QuantConfig) -> float:
    """``config.alpha``, which by now must be a number (``"auto"`` is resolved before quantizing)."""
    if config.alpha == "auto":
        raise QuantkitError(
            "alpha='auto' must be resolved to a number before smoothing (see quantkit.quantize_to_disk)"
        )
    return config.alpha


@torch.no_grad()
def apply_smoothquant(
    model: nn.Module,
    targets: dict[str, nn.Module],
    stats: ActStats,
    config: QuantConfig,
) -> Smoothed:
    """Fold SmoothQuant into the norms :func:`quantkit.core.arch.smooth_groups` maps, in place.

    For each group, ``s`` comes from the maximum activation statistic over its linears and the
    maximum weight over all their rows; ``1/s`` is folded into the norm. A linear of the group that
    is not a target gets ``s`` folded into its weight now (it reads the rescaled norm output). With
    ``config.fallback_smoothing``, every other target with statistics keeps ``1/s`` as a run-time
    pre-scale. Scales rather than smoothed weights are returned so that only one layer's fp32 weight
    exists at a time (an 8B model's would take 28 GB). ``stats`` is not modified.
    """
    offset = arch.spec_of(model).norm_offset
    modules = dict(model.named_modules())
    stats = dict(stats)
    scales: dict[str, torch.Tensor] = {}
    smooth_inv: dict[str, torch.Tensor] = {}
    covered: set[str] = set()

    for norm_name, linear_names in smoothing_groups(model, targets, stats, fallback=config.fallback_smoothing):
        # All linears of a group read the same tensor; max over them guards against hooks that saw
        # slightly different inputs (they should not).
        act_amax = torch.stack([stats[n] for n in linear_names if n in stats]).amax(dim=0)
        w_amax = torch.stack([weight_amax(modules[n]) for n in linear_names]).amax(dim=0)
        s = smoothing_scale(act_amax, w_amax, _alpha(config))
        if norm_name is None:  # no norm to fold into: a run-time pre-scale
            (n,) = linear_names
            scales[n], smooth_inv[n], stats[n] = s, 1.0 / s, stats[n] / s
            continue
        fold_into_norm(modules[norm_name], s, offset)
        for n in linear_names:
            if n in targets:
                scales[n] = s
                covered.add(n)
                stats[n] = stats[n] / s
            else:  # not quantized, but it reads the rescaled norm output: keep it exact
                w = weight_out_in(modules[n])
                w.copy_((w.float() * s[None, :]).to(w.dtype))
    log.debug(
        "smoothing: %d layers folded into norms, %d with a run-time pre-scale, %d unsmoothed",
        len(covered),
        len(smooth_inv),
        len(targets) - len(covered) - len(smooth_inv),
    )
    return Smoothed(scales, smooth_inv, stats)


def weight_amax(module: nn.Module) -> torch.Tensor:
    """A float layer's per-input-channel weight abs-max, fp32 ``[in]``."""
    return weight_out_in(module).detach().abs().amax(dim=0).float()


@torch.no_grad()
def fold_pre_scales(
    model: nn.Module,
    targets: dict[str, nn.Module],
    stats: ActStats,
    config: QuantConfig,
) -> tuple[ActStats, list[str]]:
    """Move SmoothQuant's would-be run-time pre-scales into the layers producing those inputs.

    For every :func:`quantkit.core.arch.producer_pairs` pair with both sides in ``targets``, ``s`` is
    computed as SmoothQuant does (``max|X|^alpha / max|W|^(1 - alpha)``, tied across query heads that
    share a value head), the producer's rows (and bias) are divided by ``s`` and the consumer's input
    columns multiplied by it. The float function is unchanged up to rounding, because the consumer's
    input is linear in each of the producer's output rows:

    * ``up_proj -> down_proj``: ``down``'s input is ``act(gate(x)) * up(x)``, so dividing row ``j`` of
      ``up_proj`` (and its bias) by ``s_j`` divides input ``j`` of ``down_proj`` by ``s_j``. Same for a
      ReLU MLP (OPT ``fc1 -> fc2``): ``relu(x / s) = relu(x) / s`` for ``s > 0``. Not for GELU MLPs
      (GPT-2, Falcon): those have no pair in the table.
    * ``v_proj -> o_proj``: attention output is a weighted sum of value rows, so each ``o_proj`` input
      channel ``(head h, dim d)`` is linear in ``v_proj`` output ``(kv_head(h), d)``. With grouped-query
      attention several query heads share one value head, so ``s`` must be equal across them: it is
      computed from the maximum activation and weight statistics over the heads of a group.

    Row scaling costs nothing in the producer: its weight is quantized per output row, and scaling a
    row rescales that row's int8 scale only.

    The two weights become fp32 parameters (the smoothed weight is quantized without an
    intermediate rounding to bf16, as for norm-folded smoothing): quantize right after, which
    replaces both layers (:func:`quantkit.formats.compressed_tensors.quantize_for_export` does).

    Returns:
        ``(stats, consumers)``: statistics describing the smoothed inputs (a new dict; the input is
        not modified), and the names of the consumers that were smoothed.
    """
    stats = dict(stats)
    done = []
    for p, prod_name, cons_name in arch.producer_pairs(model):
        if cons_name not in targets or prod_name not in targets or cons_name not in stats:
            continue
        producer, consumer = targets[prod_name], targets[cons_name]
        w_cons = weight_out_in(consumer).float()
        w_prod = weight_out_in(producer).float()
        rows = _producer_rows(p, model.config, w_cons.shape[1], w_prod.shape[0], cons_name)
        first = int(rows.min())
        local = rows - first
        n = int(local.max()) + 1
        # Tie s across consumer channels that read the same producer row (GQA): take the max
        # activation and weight statistic over them, then smooth as usual.
        act = torch.zeros(n).scatter_reduce(0, local, stats[cons_name].float(), "amax", include_self=False)
        w_amax = torch.zeros(n).scatter_reduce(0, local, w_cons.abs().amax(dim=0), "amax", include_self=False)
        s_rows = smoothing_scale(act, w_amax, _alpha(config))
        s = s_rows[local]
        w_prod[first : first + n] /= s_rows[:, None]
        _set_weight(producer, w_prod)
        bias = getattr(producer, "bias", None)
        if bias is not None:
            bias[first : first + n] = (bias[first : first + n].float() / s_rows).to(bias.dtype)
        _set_weight(consumer, w_cons * s[None, :])
        stats[cons_name] = stats[cons_name] / s
        done.append(cons_name)
    return stats, done


def _set_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Replace a float layer's weight by an fp32 ``[out, in]`` tensor, in the layer's own layout."""
    w = w_out_in.T if FLOAT_LINEARS[type(module).__name__].transposed else w_out_in
    module.weight = nn.Parameter(w.contiguous(), requires_grad=False)


def _producer_rows(p: arch.Producer, config: Any, consumer_in: int, producer_out: int, name: str) -> torch.Tensor:
    """For each consumer input channel, the producer output row it is linear in."""
    if not p.heads:
        if consumer_in > producer_out:
            raise QuantkitError(f"{name}: expected at most {producer_out} inputs from {p.producer}, got {consumer_in}")
        return torch.arange(consumer_in) + (producer_out - consumer_in)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = consumer_in // n_heads
    if head_dim * n_heads != consumer_in or n_heads % n_kv or n_kv * head_dim > producer_out:
        raise QuantkitError(f"{name}: cannot map {consumer_in} attention channels onto {n_kv} value heads")
    c = torch.arange(consumer_in)
    value_head = (c // head_dim) // (n_heads // n_kv)
    return (producer_out - n_kv * head_dim) + value_head * head_dim + c % head_dim
