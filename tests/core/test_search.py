"""alpha="auto" (the calibration-loss probe) and the static activation clipping search."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.core import search
from quantkit.core.calibration import collect_stats
from quantkit.core.modules import W8A8Linear
from quantkit.core.probe import Candidate, calibration_losses, choose_alpha
from quantkit.core.record import QuantRecord


def _skeleton(config):
    with init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)


def _loss(model, samples) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in samples:
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += ids.numel() - 1
    return total / count


def _with_outliers(arch: str) -> torch.nn.Module:
    """A tiny model whose norms put a few channels 40x above the rest, as real LLMs' do: how much of
    that range smoothing migrates into the weights then matters."""
    torch.manual_seed(3)
    model = make_tiny(arch)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in name.lower() and getattr(module, "weight", None) is not None and module.weight.dim() == 1:
                module.weight[:3] *= 40
    return model


def test_calibration_losses_are_those_of_the_quantized_models(tiny_arch):
    """The probe's loss for each config is the loss of the whole model quantized with it (with the
    float model's statistics, as the probe calibrates), and its float loss is the float model's."""
    float_model = _with_outliers(tiny_arch)
    samples = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    configs = [QuantConfig(alpha=a, embeddings="float") for a in (0.0, 0.5, 0.9)]
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    float_loss, losses, errors = calibration_losses(
        _skeleton(float_model.config), state.__getitem__, [Candidate(c) for c in configs], samples, progress=False
    )
    assert errors == {}  # no candidate keeps layers by their error: none measured
    assert float_loss == pytest.approx(_loss(float_model, samples), rel=1e-5)
    stats = collect_stats(float_model, samples, quantkit.select_targets(float_model, configs[0]), progress=False)
    expected = [
        _loss(quantkit.quantize(copy.deepcopy(float_model), c, stats, progress=False), samples) for c in configs
    ]
    assert losses == pytest.approx(expected, rel=1e-4)
    assert len(set(round(v, 6) for v in losses)) == len(losses)  # the configs really differ


def test_choose_alpha_picks_the_alpha_with_the_lowest_quantized_loss():
    """The known optimum: measured independently by quantizing the whole model at each alpha."""
    float_model = _with_outliers("llama")
    samples = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    alphas = (0.0, 0.3, 0.6, 0.9)
    config = QuantConfig(alpha="auto", embeddings="float")
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    chosen = choose_alpha(
        _skeleton(float_model.config), state.__getitem__, config, samples, alphas=alphas, stride=1, progress=False
    )
    stats = collect_stats(float_model, samples, quantkit.select_targets(float_model, config), progress=False)
    measured = {
        a: _loss(
            quantkit.quantize(
                copy.deepcopy(float_model), QuantConfig(alpha=a, embeddings="float"), stats, progress=False
            ),
            samples,
        )
        for a in alphas
    }
    assert chosen.chosen == min(measured, key=measured.get)
    assert chosen.alphas == alphas and chosen.tokens == 6 * 15
    assert chosen.losses == pytest.approx([measured[a] for a in alphas], rel=1e-4)


def test_auto_alpha_round_trips_through_the_checkpoint(tiny_model_dir, tmp_path):
    from quantkit.evaluation.pipeline import quantize_to_disk

    out = quantize_to_disk(
        tiny_model_dir, tmp_path / "q", QuantConfig(alpha="auto"), n_samples=4, seq_len=32, progress=False
    )
    record = quantkit.read_record(out)
    assert record.config.alpha == "auto"
    search_block = record.alpha_search
    assert search_block["chosen"] in search_block["alphas"]
    assert (
        search_block["chosen"]
        == search_block["alphas"][min(range(11), key=search_block["calibration_loss"].__getitem__)]
    )
    assert search_block["tokens"] == 2 * 31  # every other sample
    assert QuantRecord.from_dict(record.to_dict()) == record
    assert record.to_dict()["format_version"] == 4
    model = quantkit.load(out)
    assert model.config.quantization_config["alpha_search"] == search_block
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_auto_alpha_refuses_saved_statistics_before_any_work(tiny_model_dir, tmp_path):
    from quantkit.evaluation.pipeline import quantize_to_disk

    with pytest.raises(QuantkitError, match="drop --stats"):
        quantize_to_disk(tiny_model_dir, tmp_path / "q", QuantConfig(alpha="auto"), stats=tmp_path / "none.safetensors")
    assert not (tmp_path / "q").exists()


def test_whole_model_quantize_refuses_auto():
    model = make_tiny("llama")
    with pytest.raises(QuantkitError, match="quantize_to_disk"):
        quantkit.quantize(model, QuantConfig(alpha="auto"), {})


def test_config_and_record_validate_alpha():
    assert QuantConfig(alpha="auto").label == "W8A8 SmoothQuant a=auto per-token"
    assert QuantConfig(alpha="auto").auto_alpha and not QuantConfig(alpha="auto", scheme="w8a16").auto_alpha
    for bad in ("AUTO", "0.5", 1.5, True, None):
        with pytest.raises(QuantkitError, match="alpha"):
            QuantConfig(alpha=bad)
    block = QuantRecord(QuantConfig(alpha="auto"), modules=("a",)).to_dict()
    assert block["format_version"] == 3  # no search recorded: older quantkits can still read it
    for bad in ({"chosen": 0.5}, {"chosen": 2, "alphas": [2], "calibration_loss": [1.0]}, "x"):
        with pytest.raises(QuantkitError, match="alpha_search"):
            QuantRecord.from_dict({**block, "alpha_search": bad})


def _brute_force_clip(linear, x, amax):
    """The clipping ratio with the least total relative output error, computed independently."""
    reference = linear(x).detach()
    errors = {}
    for clip in search.CLIP_GRID:
        q = W8A8Linear.from_float(linear, input_scale=(amax.max() * clip).clamp_min(1e-8) / 127)
        errors[clip] = float((q(x) - reference).pow(2).sum() / reference.pow(2).sum())
    return min(errors, key=errors.get), errors


def test_static_clip_search_finds_the_least_error_clip_and_beats_abs_max():
    torch.manual_seed(0)
    model = make_tiny("llama")
    name = next(n for n in quantkit.select_targets(model, QuantConfig()) if n.endswith("down_proj"))
    linear = model.get_submodule(name)
    x = torch.randn(2048, linear.in_features)
    x[7, 5] = 25.0  # one outlier token sets the abs-max
    recorded = search.Recorded({name: [x]}, {})
    stats = {name: x.abs().amax(dim=0)}
    clips = search.search_layer(
        model, {name: linear}, recorded, stats, QuantConfig(activations="per_tensor", smoothing="none")
    )
    best, errors = _brute_force_clip(linear, x, stats[name])
    assert clips == {name: best}
    assert best < 1.0 and errors[best] < errors[1.0] / 2


def test_quantize_keeps_named_layers_w8a16_and_they_round_trip(tmp_path):
    from quantkit.core.modules import W8A16Linear

    float_model = _with_outliers("llama")
    config = QuantConfig()
    stats = collect_stats(
        float_model, torch.randint(0, 256, (3, 16)), quantkit.select_targets(float_model, config), progress=False
    )
    names = quantkit.select_targets(float_model, config)
    keep = {n for n in names if n.endswith(("down_proj", "q_proj"))}  # one pre-scaled, one norm-folded kind
    model = quantkit.quantize(copy.deepcopy(float_model), config, stats, w8a16=keep, progress=False)
    kinds = {n: type(model.get_submodule(n)) for n in names}
    assert {n for n, k in kinds.items() if k is W8A16Linear} == keep
    assert all(model.get_submodule(n).smooth_inv is None or n not in keep for n in names if kinds[n] is W8A8Linear)
    record = quantkit.QuantRecord.from_dict(model.config.quantization_config)
    assert set(record.w8a16_modules) == keep and record.to_dict()["format_version"] == 4
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        # the float function is kept: weight-only layers read the smoothed norm output with smoothed weights
        reference = float_model(input_ids=ids).logits
        assert (expected - reference).norm() < 0.05 * reference.norm()
        quantkit.save(model, tmp_path / "q")
        loaded = quantkit.load(tmp_path / "q")
        assert {n for n in names if isinstance(loaded.get_submodule(n), W8A16Linear)} == keep
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
        assert {n for n in names if isinstance(served.get_submodule(n), W8A16Linear)} == keep
        assert torch.equal(served(input_ids=ids).logits, expected)


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny Llama with its norms putting 3 channels 40x above the rest: W8A8 costs it loss (a plain
    random model's loss is flat, quantized or not)."""
    path = tmp_path_factory.mktemp("outliers") / "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight[:3] *= 40
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_max_drift_keeps_the_layers_it_records(outlier_model_dir, tmp_path):
    from quantkit.core.modules import W8A16Linear
    from quantkit.evaluation.pipeline import quantize_to_disk

    budgets, kept = [900.0], {}
    for budget in budgets:
        out = quantize_to_disk(
            outlier_model_dir,
            tmp_path / f"q{len(kept)}",
            QuantConfig(max_drift=budget),
            n_samples=4,
            seq_len=32,
            progress=False,
        )
        record = quantkit.read_record(out)
        search_block = record.drift_search
        chosen, drifts, counts = (
            search_block["chosen"],
            search_block["calibration_drift_pct"],
            search_block["w8a16_layers"],
        )
        model = quantkit.load(out)
        w8a16 = {n for n in record.modules if isinstance(model.get_submodule(n), W8A16Linear)}
        assert w8a16 == set(record.w8a16_modules)
        assert len(w8a16) == counts[chosen] and record.config.max_drift == budget
        assert drifts[chosen] <= budget or chosen == len(drifts) - 1
        # no candidate with fewer W8A16 layers met the budget
        assert all(d > budget for d, c in zip(drifts, counts, strict=True) if c < len(w8a16))
        kept[budget] = len(w8a16)
        if len(budgets) == 1:  # then a budget below what all-W8A8 gives
            assert counts[0] == 0 and counts[-1] == len(record.modules) and drifts[0] > 0, search_block
            budgets.append(drifts[0] / 2)
    assert kept[900.0] == 0  # a budget everything meets keeps every layer W8A8
    assert kept[budgets[1]] > 0


def test_max_drift_is_checked():
    with pytest.raises(QuantkitError, match="max_drift"):
        QuantConfig(max_drift=0)
    with pytest.raises(QuantkitError, match="W8A8"):
        QuantConfig(scheme="w8a16", max_drift=1.0)
    with pytest.raises(QuantkitError, match="w8a16="):
        quantkit.quantize(make_tiny("llama"), QuantConfig(max_drift=1.0), {})
    assert "max_drift" not in QuantConfig().to_dict()  # format-3 readers still take the block
