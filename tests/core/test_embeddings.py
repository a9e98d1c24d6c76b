"""int8 embeddings (QuantConfig.embeddings="int8", the default): one int8 table for a tied pair."""

import copy
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError, QuantRecord
from quantkit.core.modules import Int8Embedding, Int8TiedHead, W8A16Linear, is_float_embedding, is_float_linear
from quantkit.evaluation.measure import weight_bytes


def _tied(arch):
    model = make_tiny(arch)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return model, out.weight.data_ptr() == inp.weight.data_ptr()


def test_tied_pair_becomes_one_int8_table_that_round_trips(tmp_path, tiny_arch):
    model, tied = _tied(tiny_arch)
    with_float_embeddings = make_tiny(tiny_arch)
    quantkit.quantize(with_float_embeddings, QuantConfig(scheme="w8a16", embeddings="float"), progress=False)
    ids = torch.randint(0, 256, (1, 9))
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(inp, Int8Embedding) and type(out) is (Int8TiedHead if tied else W8A16Linear)
    qc = model.config.quantization_config
    assert qc["tied_embeddings"] is tied and qc["input_embedding"] and qc["output_embedding"]
    if tied:
        assert out.weight is inp.weight and out.weight_scale is inp.weight_scale
    # Memory saved: each fp32 table (one if tied) becomes int8 + one fp32 scale per row.
    v, h = inp.weight.shape
    saved = (1 if tied else 2) * (v * h * 4 - v * h - v * 4)
    assert weight_bytes(with_float_embeddings)["total"] - weight_bytes(model)["total"] == saved
    quantkit.save(model, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert f"{qc['input_embedding']}.weight" in keys
    assert (f"{qc['output_embedding']}.weight" in keys) is not tied  # a shared table is written once
    loaded = quantkit.load(tmp_path / "ck")
    l_in, l_out = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert l_out.weight.data_ptr() % 64 == 0  # torch's int8 kernels need aligned weights
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # The table stays shared, and the scales fp32, through a dtype cast (and device moves).
    loaded = loaded.to(torch.bfloat16)
    if tied:
        assert l_out.weight.data_ptr() == l_in.weight.data_ptr()
    assert l_in.weight_scale.dtype == torch.float32 and l_in(ids).dtype == torch.bfloat16


def test_int8_embedding_returns_the_dequantized_rows():
    emb = torch.nn.Embedding(50, 24)
    q = Int8Embedding.from_float(emb)
    ids = torch.tensor([[3, 0, 49, 3]])
    expected = q.weight.float()[ids] * q.weight_scale[ids][..., None]
    assert torch.equal(q(ids), expected)
    assert (q(ids) - emb(ids)).abs().max() <= q.weight_scale.max() / 2 + 1e-7  # round to nearest
    q = q.to(torch.bfloat16)  # the output dtype follows the model's dtype; the table stays int8
    assert q(ids).dtype == torch.bfloat16 and q.weight.dtype == torch.int8
    assert torch.equal(q(ids), expected.bfloat16())


def test_scaled_embedding_keeps_its_scale():
    """Gemma multiplies embeddings by sqrt(hidden) inside the embedding module: kept, and survives loading."""
    model = make_tiny("gemma3_text")
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 256, (1, 7))
    ref = emb(ids)
    q = Int8Embedding.from_float(emb)
    assert float(q.embed_scale) == emb.scalar_embed_scale != 1.0
    assert (q(ids) - ref).abs().max() <= (q.weight_scale.max() / 2 + 1e-7) * emb.scalar_embed_scale


def test_float_embeddings_keep_the_tie(tmp_path):
    model, tied = _tied("opt")
    assert tied
    quantkit.quantize(model, QuantConfig(scheme="w8a16", embeddings="float"), progress=False)
    assert is_float_embedding(model.get_input_embeddings()) and is_float_linear(model.get_output_embeddings())
    qc = model.config.quantization_config
    assert (qc["input_embedding"], qc["output_embedding"], qc["tied_embeddings"]) == ("", "", False)
    assert model.config.tie_word_embeddings
    quantkit.save(model, tmp_path / "ck")
    loaded = quantkit.load(tmp_path / "ck")
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_lm_head_in_the_scheme_leaves_the_input_embedding_alone_in_int8():
    """exclude=() puts lm_head in the scheme (W8A8); the input embedding is then int8 on its own."""
    model = make_tiny("opt")
    from quantkit.core.calibration import collect_stats

    config = QuantConfig(scheme="w8a8", smoothing="none", exclude=())
    stats = collect_stats(model, torch.randint(0, 256, (2, 16)), quantkit.select_targets(model, config), progress=False)
    quantkit.quantize(model, config, stats, progress=False)
    qc = model.config.quantization_config
    assert "lm_head" in qc["modules"] and qc["output_embedding"] == "" and not qc["tied_embeddings"]
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_config_field_and_old_format(tmp_path):
    with pytest.raises(QuantkitError, match="embeddings"):
        QuantConfig(embeddings="int4")
    d = QuantRecord(QuantConfig(scheme="w8a16")).to_dict()
    assert d["embeddings"] == "int8" and d["format_version"] == 3
    # Format 1 predates int8 embeddings: a block without the field means float embeddings.
    old = {k: v for k, v in d.items() if k not in ("embeddings", "input_embedding", "output_embedding")}
    old = {k: v for k, v in old.items() if k != "tied_embeddings"}
    assert QuantRecord.from_dict({**old, "format_version": 1}).config.embeddings == "float"


def test_model_whose_only_float_parameters_are_embeddings_keeps_them(tmp_path):
    """OLMo's norms have no weights: int8 embeddings would leave no parameter to read dtype/device from."""
    config = transformers.OlmoConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    assert is_float_embedding(model.get_input_embeddings()) and model.dtype == torch.bfloat16
    assert model.config.quantization_config["input_embedding"] == ""
    quantkit.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tie_is_found_on_a_meta_model():
    """Sizing a model without memory (accelerate's init_empty_weights): one table, not two."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(make_tiny("opt").config)
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    assert model.config.quantization_config["tied_embeddings"]
    assert isinstance(model.get_output_embeddings(), Int8TiedHead)


def test_tied_head_with_bias_deepcopy_and_save_pretrained_round_trip(tmp_path):
    model = make_tiny("opt")
    model.lm_head.bias = torch.nn.Parameter(torch.randn(256) * 0.1)
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        assert twin.lm_head.embedding is twin.get_input_embeddings()  # not the original's table
        assert torch.equal(twin(input_ids=ids).logits, ref)
        quantkit.save(model, tmp_path / "ck")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
        assert torch.equal(hf(input_ids=ids).logits, ref)
        hf.save_pretrained(tmp_path / "again")
        assert torch.equal(quantkit.load(tmp_path / "again")(input_ids=ids).logits, ref)


def test_tied_table_cannot_be_split_over_devices(tmp_path):
    from quantkit.formats.hf_quantizer import QuantkitHfConfig, QuantkitHfQuantizer

    model = make_tiny("opt")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    quantizer = QuantkitHfQuantizer(QuantkitHfConfig(**model.config.quantization_config))
    model.hf_device_map = {"model": 0, "lm_head": "cpu"}
    with pytest.raises(QuantkitError, match="one device"):
        quantizer._process_model_after_weight_loading(model)
    model.hf_device_map = {"": "cpu"}
    quantizer._process_model_after_weight_loading(model)


def test_scales_stay_fp32_through_dtype_casts():
    from quantkit.core.modules import W8A8Linear

    lin = torch.nn.Linear(32, 16)
    q = W8A8Linear.from_float(lin, smooth_inv=torch.rand(32) + 0.5, input_scale=torch.tensor(0.0123))
    before = {n: b.clone() for n, b in q.named_buffers()}
    q = q.to(torch.bfloat16).half().float()
    for name in ("weight_scale", "smooth_inv", "input_scale"):
        assert getattr(q, name).dtype == torch.float32 and torch.equal(getattr(q, name), before[name]), name
    assert q.bias.dtype == torch.float32 and q.weight.dtype == torch.int8


def test_format_1_checkpoint_on_disk_loads_with_float_embeddings(tmp_path):
    """A checkpoint written before int8 embeddings existed: same layout, older config block."""
    from quantkit.cli import main

    model = make_tiny("opt")
    quantkit.quantize(model, QuantConfig(scheme="w8a16", embeddings="float"), progress=False)
    quantkit.save(model, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    new_keys = ("embeddings", "input_embedding", "output_embedding", "tied_embeddings")
    qc = {k: v for k, v in cfg["quantization_config"].items() if k not in new_keys}
    cfg["quantization_config"] = {**qc, "format_version": 1}
    cfg_file.write_text(json.dumps(cfg))
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        loaded = quantkit.load(tmp_path / "ck")
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        assert torch.equal(loaded(input_ids=ids).logits, ref)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
        assert torch.equal(hf(input_ids=ids).logits, ref)
    assert main(["inspect", str(tmp_path / "ck")]) == 0


def test_inspect_describes_a_tied_table_and_finds_a_second_copy(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from quantkit.cli import main

    model = make_tiny("opt")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    quantkit.save(model, tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "int8 (per-row scales): model.decoder.embed_tokens + lm_head, one shared table" in out
    weights = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"].clone()
    save_file(tensors, str(weights))
    assert main(["inspect", str(tmp_path / "ck")]) == 1
    assert "lm_head: tied to model.decoder.embed_tokens but has a table of its own" in capsys.readouterr().out
