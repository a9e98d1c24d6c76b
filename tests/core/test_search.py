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
from quantkit.core.record import QuantRecord
from quantkit.core.sequential import calibration_losses, choose_alpha


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


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma3_text"])
def test_calibration_losses_are_those_of_the_quantized_models(arch):
    """The probe's loss for each config is the loss of the whole model quantized with it (with the
    float model's statistics, as the probe calibrates), and its float loss is the float model's."""
    float_model = _with_outliers(arch)
    samples = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    configs = [QuantConfig(alpha=a, embeddings="float") for a in (0.0, 0.5, 0.9)]
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    float_loss, losses = calibration_losses(
        _skeleton(float_model.config), state.__getitem__, configs, samples, progress=False
    )
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
            quantkit.quantize(copy.deepcopy(float_model), QuantConfig(alpha=a, embeddings="float"), stats, progress=False),
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
    assert search_block["chosen"] == search_block["alphas"][min(range(11), key=search_block["calibration_loss"].__getitem__)]
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
