"""``quantkit estimate``: figures from a config alone, checked against real models, caches and checkpoints.

Checkpoint bytes are compared exactly with the tensor bytes of the safetensors files quantkit writes
(each file is those bytes plus its 8-byte length and JSON header, which is asserted too).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import TINY_CONFIGS, make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.cli import main
from quantkit.core.calibration import collect_stats
from quantkit.evaluation.estimate import estimate

BENCH = Path(__file__).resolve().parents[2] / "eval" / "bench_model_gpu.py"


def _config_folder(model: torch.nn.Module, folder: Path) -> Path:
    model.config.save_pretrained(folder)
    return folder


def _tensor_bytes(folder: Path) -> int:
    """Bytes of the tensors in a folder's safetensors files, read from their headers; asserts that each
    file holds nothing else (8-byte header length + JSON header + tensor data)."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    assert files
    for file in files:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])
        assert file.stat().st_size == 8 + n + data
        total += data
    return total


def _quantized_checkpoint(arch: str, config: QuantConfig, out: Path) -> Path:
    """A tiny model quantized as the README's Python example does (calibrated in fp32, bf16 otherwise), saved."""
    model = make_tiny(arch)
    stats = None
    if config.needs_calibration:
        torch.manual_seed(0)
        samples = torch.randint(0, 256, (2, 16))
        stats = collect_stats(model, samples, quantkit.select_targets(model, config), progress=False)
    model.to(torch.bfloat16)
    quantkit.quantize(model, config, stats, progress=False)
    return quantkit.save(model, out)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """``(arch, float model, config folder, estimate)`` for every architecture of the table."""
    arch = request.param
    model = make_tiny(arch)
    folder = _config_folder(model, tmp_path_factory.mktemp(arch) / "config")
    return arch, model, folder, estimate(folder, progress=False)


def test_parameters_are_the_models(tiny):
    _, model, _, est = tiny
    assert sum(est.parameters.values()) == sum(p.numel() for p in model.parameters())
    assert est.parameters["embeddings"] >= model.get_input_embeddings().weight.numel()
    assert est.parameters["attention"] > 0 and est.parameters["mlp"] > 0
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert est.shape["tied_embeddings"] is tied
    assert est.parameters["lm_head"] == (0 if tied else model.get_output_embeddings().weight.numel())


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_quantized_bytes_are_the_checkpoints(tiny, scheme, tmp_path):
    arch, _, _, est = tiny
    out = _quantized_checkpoint(arch, QuantConfig(scheme=scheme), tmp_path / scheme)
    assert est.weight_bytes[scheme] == _tensor_bytes(out)


def test_float_bytes_are_the_checkpoints(tiny, tmp_path):
    _, model, _, est = tiny
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert est.weight_bytes["bf16"] == _tensor_bytes(tmp_path / "bf16")
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert est.weight_bytes["fp32"] == fp32 == 2 * est.weight_bytes["bf16"]  # no non-float tensor in these


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float_embeddings_bytes(arch, tmp_path):
    folder = _config_folder(make_tiny(arch), tmp_path / "config")
    est = estimate(folder, embeddings="float", progress=False)
    for scheme in ("w8a16", "w8a8"):
        out = _quantized_checkpoint(arch, QuantConfig(scheme=scheme, embeddings="float"), tmp_path / scheme)
        assert est.weight_bytes[scheme] == _tensor_bytes(out)
    assert est.weight_bytes["w8a16"] > estimate(folder, progress=False).weight_bytes["w8a16"]


@pytest.mark.parametrize(
    ("arch", "lookup"),
    [
        ("llama", {"bf16": 2 * 256 * 64, "w8a16": 256 * 64 + 4 * 256}),  # untied: the input table is a lookup
        ("gemma", {"bf16": 0, "w8a16": 0}),  # tied: lm_head reads the whole table every step
        ("gpt2", {"bf16": 2 * 1024 * 64, "w8a16": 2 * 1024 * 64}),  # tied; the position table (bf16) is a lookup
    ],
)
def test_decode_reads_all_but_lookup_tables(arch, lookup, tmp_path):
    est = estimate(_config_folder(make_tiny(arch), tmp_path), progress=False)
    for variant, unread in lookup.items():
        assert est.decode_ceiling(variant)["weight_bytes_read"] == est.weight_bytes[variant] - unread


def test_kv_cache_bytes_are_the_real_caches(tiny):
    """The KV bytes per token are what the real model's cache holds after a forward, in bf16."""
    arch, model, _, est = tiny
    tokens = 7
    with torch.no_grad():
        out = copy.deepcopy(model).to(torch.bfloat16)(torch.randint(0, 256, (1, tokens)), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert est.kv_bytes_per_token * tokens == held
    text = model.config
    kv_heads = {"falcon-sequential": 1, "falcon-parallel": 1}.get(  # multi-query Falcon: one KV head
        arch, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    )
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert est.kv_bytes_per_token == text.num_hidden_layers * 2 * kv_heads * head_dim * 2


def test_kv_cache_formula_and_context(tmp_path):
    config = transformers.LlamaConfig(**TINY_CONFIGS["llama"][1], max_position_embeddings=1000)
    config.save_pretrained(tmp_path)
    est = estimate(tmp_path, kv_dtype="float32", progress=False)
    assert est.context == 1000  # the model's limit, below the default 4096
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x fp32
    assert est.kv_bytes_per_token == per_token and est.kv_bytes_per_sequence == 1000 * per_token
    est = estimate(tmp_path, context=100, batch=3, progress=False)
    d = est.to_dict()["kv_cache"]
    assert d["bytes_per_token"] == per_token // 2 and d["bytes"] == 3 * 100 * per_token // 2


def test_sliding_window_layers_hold_their_window(tmp_path):
    """Gemma 2 alternates sliding-window and full layers: those cache and read at most their window."""
    kwargs = dict(TINY_CONFIGS["gemma2"][1], num_hidden_layers=4, sliding_window=8)
    transformers.Gemma2Config(**kwargs).save_pretrained(tmp_path)
    est = estimate(tmp_path, context=100, progress=False)
    per_layer = 2 * 2 * 16 * 2  # K and V x 2 KV heads x 16 x bf16
    assert est.kv_bytes_per_token == 4 * per_layer
    assert est.kv_bytes_per_sequence == 2 * per_layer * 8 + 2 * per_layer * 100
    assert est.attention_flops_per_token == 2 * 4 * (16 + 16) * (2 * 8 + 2 * 100)
    assert any("2 of 4 layers attend within a sliding window of 8 tokens" in n for n in est.notes)


def test_kv_cache_from_the_config_when_the_model_cannot_run_on_meta(tmp_path, monkeypatch):
    transformers.LlamaConfig(**TINY_CONFIGS["llama"][1]).save_pretrained(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("data-dependent routing")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", fail)
    est = estimate(tmp_path, progress=False)
    assert est.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert any("KV cache from the config" in n and "data-dependent routing" in n for n in est.notes)


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    """The Llama-3-8B shapes of eval/bench_model_gpu.py (hidden 4096, intermediate 14336, 32 layers, 32 heads,
    8 KV heads, vocab 128256, untied), as a config folder, and the model transformers builds from it on meta."""
    spec = importlib.util.spec_from_file_location("bench_model_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, bench)
    spec.loader.exec_module(bench)
    config = bench.make_config(bench.parse_args([]))
    folder = tmp_path_factory.mktemp("llama8b")
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return folder, model


def test_llama3_8b_shapes(llama8b):
    folder, model = llama8b
    est = estimate(folder / "config.json", progress=False)  # a bare config.json
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(est.parameters.values()) == 8_030_261_248
    h, inter, layers, kv_dim, vocab = 4096, 14336, 32, 8 * 128, 128256
    attention, mlp = layers * (2 * h * h + 2 * h * kv_dim), layers * 3 * h * inter
    assert est.parameters == {
        "embeddings": vocab * h,
        "attention": attention,
        "mlp": mlp,
        "lm_head": vocab * h,
        "other": layers * 2 * h + h,  # two RMSNorms per layer and the final one
    }
    # Checkpoint bytes: int8 weights + fp32 scale per output channel; the int8 embedding and lm_head the
    # same per row; W8A8 adds fp32 pre-scales to o_proj and down_proj (their inputs); norms bf16.
    norms = 2 * est.parameters["other"]
    out_channels = layers * (h + kv_dim + kv_dim + h + inter + inter + h)
    w8a16 = attention + mlp + 4 * out_channels + 2 * (vocab * h + 4 * vocab) + norms
    assert est.weight_bytes == {
        "fp32": 4 * total,
        "bf16": 2 * total,
        "w8a16": w8a16,
        "w8a8": w8a16 + 4 * layers * (h + inter),
    }
    assert 0.500 < est.weight_bytes["w8a16"] / est.weight_bytes["bf16"] < 0.501
    # KV cache: 32 layers x (K, V) x 8 KV heads x 128 x bf16 = 128 KiB per token; context 4096 (its limit: 8192).
    assert est.kv_bytes_per_token == 131_072 and est.context == 4096
    assert est.kv_bytes_per_sequence == 4096 * 131_072
    matmul = attention + mlp + vocab * h  # lm_head; the input embedding is a lookup
    assert est.matmul_params == matmul
    assert est.flops_per_token == 2 * matmul + layers * 2 * 32 * (128 + 128) * 4096
    # A step reads the weights but the input embedding table, and the KV cache, at 3350 GB/s.
    ceiling = est.decode_ceiling("w8a16")
    assert ceiling["weight_bytes_read"] == w8a16 - (vocab * h + 4 * vocab)
    assert ceiling["tokens_per_s"] == pytest.approx(3350e9 / (ceiling["weight_bytes_read"] + 4096 * 131_072))
    assert 415 < ceiling["tokens_per_s"] < 417 and 214 < est.decode_ceiling("bf16")["tokens_per_s"] < 216


def test_cli_text_and_json(llama8b, capsys):
    folder, _ = llama8b
    assert main(["estimate", str(folder), "--context", "8192", "--batch", "4", "--bandwidth", "4800"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM (llama): 32 layers, hidden 4096, 32 heads / 8 KV heads of 128" in out
    assert "  total                  8,030,261,248" in out
    assert "  W8A16                  8,037,058,560" in out
    assert "embedding int8, lm_head int8 weight-only (--embeddings int8, the default)" in out
    assert "KV cache (bfloat16): 131,072 B per token = 32 layers x 2 x 8 KV heads x 128 x 2 B" in out
    assert "context 8192, batch 4: 4,294,967,296 B" in out
    assert "bandwidth-bound decode ceiling at 4800 GB/s, batch 4" in out

    assert main(["estimate", str(folder), "--json", "--context", "8192", "--batch", "4", "--bandwidth", "4800"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"]["total"] == 8_030_261_248
    assert d["weights"]["w8a8"]["bytes"] == 8_039_417_856
    assert d["kv_cache"] == {
        "dtype": "bfloat16",
        "bytes_per_token": 131_072,
        "context": 8192,
        "batch": 4,
        "bytes_per_sequence": 8192 * 131_072,
        "bytes": 4 * 8192 * 131_072,
        "layers": 32,
        "sliding_window_layers": 0,
    }
    vocab, h = 128256, 4096
    lookup = {"bf16": 2 * vocab * h, "w8a16": vocab * h + 4 * vocab, "w8a8": vocab * h + 4 * vocab}  # input embedding
    for variant, c in d["decode"]["ceiling"].items():
        weights = d["weights"][variant]["bytes"] - lookup[variant]
        assert c["weight_bytes_read"] == weights and c["kv_bytes_read"] == 4 * 8192 * 131_072
        assert c["tokens_per_s"] == pytest.approx(4 * 4800e9 / (weights + 4 * 8192 * 131_072))
    assert d["quantization"]["embeddings"] == "int8" and d["quantization"]["pre_scaled_layers"] == 64


def test_cli_checkpoint_is_what_it_estimates(tiny_model_dir, tmp_path, capsys):
    """What ``quantkit quantize`` (layer by layer, alpha auto) writes is what the estimate says."""
    out = tmp_path / "w8a8"
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q"]) == 0
    assert main(["estimate", str(tiny_model_dir), "--json", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights"]["w8a8"]["bytes"] == _tensor_bytes(out)
    assert d["weights"]["bf16"]["bytes"] == _tensor_bytes(tiny_model_dir)  # saved in bf16


def test_default_model(default_model_dir):
    est = estimate("smollm2-135m", progress=False)
    assert est.model == str(default_model_dir / "config.json")
    assert est.weight_bytes["bf16"] == _tensor_bytes(default_model_dir)  # stored bf16, tied table once
    assert 2 * sum(est.parameters.values()) == est.weight_bytes["bf16"] and est.shape["tied_embeddings"]


def _write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LLAMA = dict(model_type="llama", **TINY_CONFIGS["llama"][1])
BAD = {
    "missing": (None, "not found: pass a local model folder, its config.json, or smollm2-135m"),
    "no config.json": ({}, "has no config.json; pass a Hugging Face model folder or its config.json"),
    "not json": ("{", "is not valid JSON"),
    "no model_type": ({"hidden_size": 64}, "has no model_type"),
    "unknown model_type": ({**LLAMA, "model_type": "llama99"}, "model_type 'llama99' is unknown to transformers"),
    "no size": ({"model_type": "llama"}, "does not set hidden_size and num_hidden_layers"),
    "bad shape": ({**LLAMA, "num_attention_heads": 5}, "fix its config.json"),
    "remote code": ({**LLAMA, "auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}}, "quantkit never runs"),
    "quantized": ({**LLAMA, "quantization_config": {"quant_method": "quantkit"}}, "estimate the float model"),
    "not a causal LM": ({"model_type": "clip", "hidden_size": 64, "num_hidden_layers": 2}, "not a causal language"),
    "mamba": ({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2}, "does not support"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, tmp_path, capsys):
    content, message = BAD[case]
    folder = tmp_path / "model"
    if content == {}:
        folder.mkdir()
    elif isinstance(content, dict):
        _write(folder, content)
    elif isinstance(content, str):
        folder.mkdir()
        (folder / "config.json").write_text(content)
    # Code a model folder points at must never run: it would leave this marker.
    marker = tmp_path / "ran"
    if folder.is_dir():
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert main(["estimate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantkit: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not marker.exists()
    with pytest.raises(QuantkitError):
        estimate(folder, progress=False)


def test_bad_options_are_refused(tmp_path, capsys):
    folder = _write(tmp_path, LLAMA)
    for option in (["--context", "0"], ["--batch", "0"], ["--bandwidth", "-1"], ["--bandwidth", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(["estimate", str(folder), *option])
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_config_defaults_are_noted(tmp_path):
    """Gemma 3's published text_config leaves vocab_size and num_attention_heads to the defaults: said, not refused."""
    config = {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}
    est = estimate(_write(tmp_path, config), progress=False)
    assert est.shape["vocab_size"] == transformers.Gemma3TextConfig().vocab_size
    assert any("does not set vocab_size or num_attention_heads" in n for n in est.notes)


def test_api_refuses_bad_arguments_and_unbuildable_models(tmp_path, monkeypatch):
    folder = _write(tmp_path, LLAMA)
    for kwargs in ({"kv_dtype": "int4"}, {"batch": 0}, {"context": 0}, {"bandwidth_gb_s": 0}, {"embeddings": "fp8"}):
        with pytest.raises(QuantkitError):
            estimate(folder, progress=False, **kwargs)

    def fail(*args, **kwargs):
        raise ValueError("bad rope_scaling\nmore detail")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", fail)
    with pytest.raises(QuantkitError, match=r"cannot build the model of .* from its config \(bad rope_scaling\); fix"):
        estimate(folder, progress=False)
