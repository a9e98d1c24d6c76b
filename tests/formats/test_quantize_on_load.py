"""Quantize while loading: ``from_pretrained(float_dir, quantization_config=QuantkitConfig(...))``."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.cli import main
from quantkit.core.calibration import read_stats
from quantkit.core.modules import W8A8Linear, W8A16Linear
from quantkit.formats.inspect import inspect
from quantkit.formats.safetensors_io import CheckpointReader

SMALL = {"samples": 2, "seq_len": 32}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _by_api(folder, scheme, stats=None):
    """The same model quantized with quantkit's own API (load float, quantize)."""
    model, _, _ = quantkit.load_float(folder, dtype=torch.bfloat16)
    return quantkit.quantize(model, QuantConfig(scheme=scheme), stats, progress=False)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_quantize_on_load_then_save_pretrained_is_a_quantkit_checkpoint(scheme, tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantkit.QuantkitConfig(scheme, **SMALL)
    )
    cls = W8A16Linear if scheme == "w8a16" else W8A8Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, cls)
    record = quantkit.core.record.record_of(model)
    with CheckpointReader(tiny_model_dir) as reader:
        assert record.source_fingerprint == reader.fingerprint()  # quantkit eval --baseline can check it
    model.save_pretrained(tmp_path / "ck")
    info = inspect(tmp_path / "ck")
    assert info.consistent and len(info.quantized) == 14
    ids = torch.randint(0, 200, (2, 12))
    assert torch.equal(_logits(quantkit.load(tmp_path / "ck"), ids), _logits(model, ids))
    if scheme == "w8a16":  # no calibration: exactly what quantkit.quantize makes
        assert torch.equal(_logits(_by_api(tiny_model_dir, scheme), ids), _logits(model, ids))


def test_w8a8_takes_saved_statistics(tiny_model_dir, tmp_path):
    stats_file = tmp_path / "stats.safetensors"
    assert (
        main(["calibrate", str(tiny_model_dir), "--out", str(stats_file), "-q", "--samples", "2", "--seq-len", "32"])
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantkit.QuantkitConfig("w8a8", stats=stats_file)
    )
    ids = torch.randint(0, 200, (1, 16))
    expected = _by_api(tiny_model_dir, "w8a8", read_stats(stats_file)[0])
    assert torch.equal(_logits(expected, ids), _logits(model, ids))


def test_bad_requests_fail_before_any_weight_is_read(tiny_model_dir, tmp_path, monkeypatch):
    for kwargs, message in [
        ({"scheme": "w8a9"}, "unknown scheme"),
        ({"scheme": "w8a8", "alpha": "auto"}, "quantkit quantize --alpha auto"),
        ({"scheme": "w8a8", "stats": tmp_path / "none.safetensors"}, "does not exist"),
        ({"scheme": "w8a16", "group_size": 128}, "unexpected keyword argument 'group_size'"),
    ]:
        with pytest.raises(QuantkitError, match=message):
            quantkit.QuantkitConfig(**kwargs)
    # Statistics of another model: refused when the skeleton is built, before the weights load.
    other = {"model.layers.0.self_attn.q_proj": torch.ones(64)}
    from safetensors.torch import save_file

    save_file(other, tmp_path / "other.safetensors")
    from quantkit.formats.hf_quantizer import QuantkitHfQuantizer

    # Refused in the hook transformers runs before it loads weights, not in the one after.
    monkeypatch.setattr(QuantkitHfQuantizer, "_quantize_loaded", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(QuantkitError, match="made on another model"):
        AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=quantkit.QuantkitConfig("w8a8", stats=tmp_path / "other.safetensors")
        )
    # A folder without a tokenizer cannot calibrate: said before loading.
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(bare)
    with pytest.raises(QuantkitError, match="tokenizer"):
        AutoModelForCausalLM.from_pretrained(bare, quantization_config=quantkit.QuantkitConfig("w8a8"))


def test_an_already_quantized_checkpoint_is_not_requantized(tiny_model_dir, tmp_path):
    """QuantkitConfig on a quantkit checkpoint: transformers refuses the mix in one clear message."""
    ck = tmp_path / "ck"
    assert main(["quantize", str(tiny_model_dir), "--scheme", "w8a16", "--out", str(ck), "-q"]) == 0
    with pytest.raises(ValueError, match="quantized with QuantkitHfConfig but you are passing a QuantkitConfig"):
        AutoModelForCausalLM.from_pretrained(ck, quantization_config=quantkit.QuantkitConfig("w8a8", **SMALL))
    assert isinstance(AutoModelForCausalLM.from_pretrained(ck).model.layers[0].self_attn.q_proj, W8A16Linear)
