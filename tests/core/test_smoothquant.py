"""SmoothQuant folding leaves the float function unchanged, for every architecture in the table.

This is the architecture-independent check of the mapping table: folding 1/s into a norm that does
not feed exactly the mapped linears would change the outputs.
"""

import pytest
import torch
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, select_targets
from quantkit.core import arch
from quantkit.core.calibration import collect_stats
from quantkit.core.modules import FLOAT_LINEARS, W8A8Linear, weight_out_in
from quantkit.core.smoothquant import apply_smoothquant, smoothing_scale


def _random_stats(targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed per-channel ranges, like real activations, so s is far from 1.
    return {
        n: torch.rand(m.weight.shape[0 if type(m).__name__ == "Conv1D" else 1], generator=g) ** 4 * 50 + 0.01
        for n, m in targets.items()
    }


def _apply_in_float(model, smoothed):
    """Scale the float layers' input columns as quantize() would, and apply pre-scales with hooks."""
    for name, s in smoothed.scales.items():
        m = model.get_submodule(name)
        w = weight_out_in(m).detach() * s[None, :]
        m.weight.data.copy_(w.T if FLOAT_LINEARS[type(m).__name__].transposed else w)
    for name, inv in smoothed.smooth_inv.items():
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, inv=inv: (args[0] * inv,))


def _norm_outputs(model, norms, ids):
    """The output of each named norm module on ``ids``."""
    out = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _a, y, n=n: out.__setitem__(n, y.detach()))
        for n in norms
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("fallback", [True, False])
def test_smoothing_preserves_float_outputs(tiny_arch, fallback):
    model = make_tiny(tiny_arch)
    ids = torch.randint(0, 256, (2, 12))
    groups = arch.smooth_groups(model)
    norms_before = _norm_outputs(model, [n for n, _ in groups], ids)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    config = QuantConfig(scheme="w8a8", alpha=0.5, fallback_smoothing=fallback)
    targets = select_targets(model, config)
    smoothed = apply_smoothquant(model, targets, _random_stats(targets), config)
    with torch.no_grad():
        _apply_in_float(model, smoothed)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # 1/s is in the norms: each mapped norm's output is divided by its group's s.
    norms_after = _norm_outputs(model, [n for n, _ in groups], ids)
    for norm, linears in groups:
        s = smoothed.scales[linears[0]]
        assert all(smoothed.scales[n] is s for n in linears) and (s - 1).abs().max() > 0.5
        torch.testing.assert_close(norms_after[norm] * s, norms_before[norm], rtol=1e-4, atol=1e-4)
    # The table must actually map this architecture: some layers folded into norms.
    folded = len(smoothed.scales) - len(smoothed.smooth_inv)
    assert folded >= 2 * model.config.num_hidden_layers, f"{tiny_arch}: only {folded} layers folded"
    assert bool(smoothed.smooth_inv) == fallback


@pytest.mark.parametrize("name", ["llama", "opt", "phi3"])
def test_smoothed_stats_describe_smoothed_activations(name):
    """The returned statistics are what calibrating the smoothed model would measure; the input is kept."""
    model = make_tiny(name)
    samples = torch.randint(0, 256, (3, 16))
    config = QuantConfig(scheme="w8a8", alpha=0.5)
    targets = select_targets(model, config)
    stats = collect_stats(model, samples, targets, progress=False)
    kept = {n: t.clone() for n, t in stats.items()}
    smoothed = apply_smoothquant(model, targets, stats, config)
    assert smoothed.stats is not stats and stats.keys() == kept.keys()
    assert all(torch.equal(stats[n], kept[n]) for n in stats)
    assert set(smoothed.scales) == set(targets) and smoothed.smooth_inv
    # The pre-scale hooks run before the calibration hooks, as the quantized modules multiply first.
    _apply_in_float(model, smoothed)
    measured = collect_stats(model, samples, targets, progress=False)
    for n in targets:
        torch.testing.assert_close(smoothed.stats[n], measured[n], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(smoothed.stats[n], stats[n], rtol=1e-2), n  # s is not ~1: the check can fail


def test_quantize_smooths_through_norms_and_pre_scales():
    """Through the public verb: norm-fed layers carry no pre-scale, the others do; the statistics are kept."""
    model = make_tiny("llama")
    norms = {n: model.get_submodule(n).weight.detach().clone() for n, _ in arch.smooth_groups(model)}
    stats = _random_stats(select_targets(model, QuantConfig()))
    kept = {n: t.clone() for n, t in stats.items()}
    quantkit.quantize(model, QuantConfig(scheme="w8a8"), stats, progress=False)
    assert all(torch.equal(stats[n], kept[n]) for n in kept) and stats.keys() == kept.keys()
    assert all(not torch.equal(model.get_submodule(n).weight, w) for n, w in norms.items())
    pre_scaled = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear) and m.smooth_inv is not None}
    folded = {n for _, linears in arch.smooth_groups(model) for n in linears}
    assert folded and pre_scaled == {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)} - folded


def test_first_applicable_layout_per_decoder_layer(monkeypatch):
    """A layout whose config condition fails is skipped; of those that apply, only the first is used."""
    model = make_tiny("llama")
    both = arch.ARCHITECTURES["llama"].layouts[0]
    mlp_only = arch.Layout((arch.SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),))
    unmet = arch.Layout(both.groups, requires={"no_such_attribute": True})
    monkeypatch.setitem(arch.ARCHITECTURES, "llama", arch.ArchSpec((unmet, mlp_only, both)))
    assert [norm for norm, _ in arch.smooth_groups(model)] == [
        f"model.layers.{i}.post_attention_layernorm" for i in range(model.config.num_hidden_layers)
    ]


def test_wrong_mapping_would_be_caught():
    """Guard for the test above: folding into a norm that feeds other layers changes outputs."""
    model = make_tiny("llama")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        layer = model.model.layers[0]
        s = torch.rand(64) + 0.5
        layer.input_layernorm.weight.div_(s)
        layer.self_attn.q_proj.weight.mul_(s)  # k_proj and v_proj "forgotten"
        after = model(input_ids=ids).logits
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)


def test_every_table_entry_is_covered_by_a_tiny_model():
    from tiny_models import TINY_CONFIGS, make_tiny

    covered = {make_tiny(n).config.model_type for n in TINY_CONFIGS}
    assert set(arch.ARCHITECTURES) - covered <= {"gemma3"}  # gemma3 (multimodal) shares gemma3_text's spec


def test_unknown_architecture_gets_fallback_only(monkeypatch):
    model = make_tiny("llama")
    monkeypatch.setattr(model.config, "model_type", "some-new-arch")
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    config = QuantConfig(scheme="w8a8")
    targets = select_targets(model, config)
    quantkit.quantize(model, config, _random_stats(targets), progress=False)
    assert all(isinstance(model.get_submodule(n), W8A8Linear) for n in targets)
    assert all(model.get_submodule(n).smooth_inv is not None for n in targets)
    assert all(torch.equal(model.get_parameter(n), w) for n, w in norms.items())  # no norm folded


def test_smoothing_scale_formula_and_dead_channels():
    a = torch.tensor([4.0, 0.0, 9.0])
    w = torch.tensor([1.0, 2.0, 0.0])
    s = smoothing_scale(a, w, alpha=0.5)
    assert torch.allclose(s[0], torch.tensor(2.0))  # 4^0.5 / 1^0.5
    assert s[1] == 1 and s[2] == 1  # dead channels untouched
