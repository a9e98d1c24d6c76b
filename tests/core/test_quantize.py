"""Quantizing tiny models of each architecture: accuracy vs float, checkpoint round trip."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError, QuantRecord
from quantkit.core.modules import Int8Embedding, Int8TiedHead, W8A8Linear, W8A16Linear, is_float_linear
from quantkit.qmath import sqnr_db

CONFIGS = {
    "w8a16": QuantConfig(scheme="w8a16"),
    "w8a8-sq": QuantConfig(scheme="w8a8"),
    "w8a8-static": QuantConfig(scheme="w8a8", activations="per_tensor"),
}


def _stats(model, seed=0):
    torch.manual_seed(seed)
    samples = torch.randint(0, 256, (4, 32))
    from quantkit.core.calibration import collect_stats

    return collect_stats(model, samples, quantkit.select_targets(model, QuantConfig()), progress=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_logits_close_to_float(tiny_arch, name):
    model = make_tiny(tiny_arch)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    stats = _stats(model)
    quantkit.quantize(model, CONFIGS[name], stats, progress=False)
    cls = W8A16Linear if name == "w8a16" else W8A8Linear
    assert all(not is_float_linear(m) for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn", "fc1")))
    assert any(isinstance(m, cls) for m in model.modules())
    # lm_head is excluded from the scheme; with int8 embeddings (the default) it is weight-only.
    assert type(model.get_output_embeddings()) in (W8A16Linear, Int8TiedHead)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    # Random tiny models are harder than trained ones (no redundancy); these floors still catch
    # a wrong scale, transpose or fold (which give < 10 dB).
    floor = {"w8a16": 30, "w8a8-sq": 18, "w8a8-static": 12}[name]
    assert sqnr_db(ref, out) > floor


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_arch):
    model = make_tiny(tiny_arch)
    quantkit.quantize(model, QuantConfig(scheme="w8a8", activations="per_tensor"), _stats(model), progress=False)
    quantkit.save(model, tmp_path / "ck")
    loaded = quantkit.load(tmp_path / "ck")
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # torch's AVX-512 int8 kernels crash on misaligned weights: loading must give aligned memory.
    assert all(b.data_ptr() % 64 == 0 for n, b in loaded.named_buffers() if b.dtype == torch.int8)


def test_w8a16_needs_no_calibration_but_w8a8_does():
    model = make_tiny("llama")
    with pytest.raises(QuantkitError, match="calibration"):
        quantkit.quantize(model, QuantConfig(scheme="w8a8"))
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    with pytest.raises(QuantkitError, match="already quantized"):
        quantkit.quantize(model, QuantConfig(scheme="w8a16"))


def test_include_exclude_patterns():
    model = make_tiny("llama")
    quantkit.quantize(
        model,
        QuantConfig(scheme="w8a16", include=("mlp.*",), exclude=("layers.1.*", "lm_head"), embeddings="float"),
        progress=False,
    )
    quantized = {n for n, m in model.named_modules() if isinstance(m, W8A16Linear)}
    assert quantized == {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(QuantkitError, match="no linear layers matched"):
        quantkit.quantize(make_tiny("llama"), QuantConfig(scheme="w8a16", include=("nothing",)))


def test_quantized_tied_lm_head_is_untied_and_round_trips(tmp_path):
    model = make_tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantkit.quantize(model, QuantConfig(scheme="w8a16", exclude=()), progress=False)
    assert isinstance(model.lm_head, W8A16Linear) and model.config.tie_word_embeddings is False
    quantkit.save(model, tmp_path / "ck")
    loaded = quantkit.load(tmp_path / "ck")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_config_validation_and_round_trip():
    with pytest.raises(QuantkitError, match="alpha"):
        QuantConfig(alpha=1.5)
    with pytest.raises(QuantkitError, match="alpha"):
        QuantConfig(alpha="0.5")
    with pytest.raises(QuantkitError, match="scheme"):
        QuantConfig(scheme="w4a16")
    with pytest.raises(QuantkitError, match="exclude"):
        QuantConfig(exclude=[1])
    c = QuantConfig(scheme="w8a8", alpha=0.7, include=["a"])
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert QuantConfig.from_dict({**c.to_dict(), "alpha": 0.8}) != c
    with pytest.raises(QuantkitError, match="unknown"):
        QuantConfig.from_dict({**c.to_dict(), "modules": []})  # the record's field, not the request's
    with pytest.raises(QuantkitError, match="read_record"):  # a checkpoint's block is a record
        QuantConfig.from_dict(QuantRecord(c, modules=("x",)).to_dict())
    assert QuantConfig(alpha=np.float32(0.25)).alpha == 0.25 and type(QuantConfig(alpha=1).alpha) is float


def test_record_round_trip_sees_every_field():
    c = QuantConfig(scheme="w8a8", alpha=0.7, include=["a"])
    r = QuantRecord(c, modules=("x", "y"), input_embedding="emb", output_embedding="head", tied_embeddings=True)
    block = r.to_dict()
    assert block["quant_method"] == "quantkit" and block["format_version"] == 3 and block["alpha"] == 0.7
    assert QuantRecord.from_dict(block) == r
    # What was done is part of the comparison: a lost or changed record is visible.
    changes = [{"modules": ["x"]}, {"output_embedding": "other"}, {"tied_embeddings": False}, {"alpha": 0.5}]
    for change in changes:
        assert QuantRecord.from_dict({**block, **change}) != r, change
    with pytest.raises(QuantkitError, match="not quantkit"):
        QuantRecord.from_dict({"quant_method": "gptq"})
    with pytest.raises(QuantkitError, match="upgrade"):
        QuantRecord.from_dict({**block, "format_version": 99})
    with pytest.raises(QuantkitError, match="format_version"):
        QuantRecord.from_dict({**block, "format_version": "2"})
    with pytest.raises(QuantkitError, match="modules"):
        QuantRecord.from_dict({**block, "modules": 3})
    with pytest.raises(QuantkitError, match="both"):
        QuantRecord.from_dict({**block, "input_embedding": ""})  # tied, but to nothing
    with pytest.raises(QuantkitError, match="unknown"):
        QuantRecord.from_dict({**block, "colour": "blue"})


def test_quantize_records_what_it_did():
    model = make_tiny("llama")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    record = QuantRecord.from_dict(model.config.quantization_config)
    linears = {n for n, m in model.named_modules() if isinstance(m, W8A16Linear)} - {record.output_embedding}
    assert set(record.modules) == linears and record.config == QuantConfig(scheme="w8a16")
    assert record.input_embedding == "model.embed_tokens"
