"""SmoothQuant folding leaves the float function unchanged, for every architecture in the table.

This is the architecture-independent check of the mapping table: folding 1/s into a norm that does
not feed exactly the mapped linears would change the outputs.
"""

import pytest
import torch
from tiny_models import make_tiny

from quantkit import QuantConfig, select_targets
from quantkit.core import arch
from quantkit.core.modules import FLOAT_LINEARS, weight_out_in
from quantkit.core.quantize import _plan_smoothing
from quantkit.core.smoothquant import smoothing_scale


def _random_stats(targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed per-channel ranges, like real activations, so s is far from 1.
    return {
        n: torch.rand(m.weight.shape[0 if type(m).__name__ == "Conv1D" else 1], generator=g) ** 4 * 50 + 0.01
        for n, m in targets.items()
    }


def _apply_plan_in_float(model, scales, smooth_inv):
    """Scale the float layers' input columns as quantize() would, and apply pre-scales with hooks."""
    for name, s in scales.items():
        m = model.get_submodule(name)
        w = weight_out_in(m).detach() * s[None, :]
        m.weight.data.copy_(w.T if FLOAT_LINEARS[type(m).__name__].transposed else w)
    for name, inv in smooth_inv.items():
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, inv=inv: (args[0] * inv,))


@pytest.mark.parametrize("fallback", [True, False])
def test_smoothing_preserves_float_outputs(tiny_arch, fallback):
    model = make_tiny(tiny_arch)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    config = QuantConfig(scheme="w8a8", alpha=0.5, fallback_smoothing=fallback)
    targets = select_targets(model, config)
    stats = _random_stats(targets)
    with torch.no_grad():
        scales, smooth_inv = _plan_smoothing(model, targets, stats, config)
        _apply_plan_in_float(model, scales, smooth_inv)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # The table must actually map this architecture: some layers folded into norms.
    folded = len(scales) - len(smooth_inv)
    assert folded >= 2 * model.config.num_hidden_layers, f"{tiny_arch}: only {folded} layers folded"
    assert bool(smooth_inv) == fallback


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
    config = QuantConfig(scheme="w8a8")
    targets = select_targets(model, config)
    _weights, smooth_inv = _plan_smoothing(model, targets, _random_stats(targets), config)
    assert set(smooth_inv) == set(targets)


def test_smoothing_scale_formula_and_dead_channels():
    a = torch.tensor([4.0, 0.0, 9.0])
    w = torch.tensor([1.0, 2.0, 0.0])
    s = smoothing_scale(a, w, alpha=0.5)
    assert torch.allclose(s[0], torch.tensor(2.0))  # 4^0.5 / 1^0.5
    assert s[1] == 1 and s[2] == 1  # dead channels untouched
