"""compressed-tensors export, checked with the ``compressed-tensors`` PyPI package itself.

The package parses the exported ``quantization_config`` (pydantic, strict arguments) and its own
compressors decompress every quantized layer; the result must equal, bit for bit, the dense weight
quantkit's model multiplies with: ``dequantize(q, scale, dtype)`` = ``(q * scale)`` computed in fp32
(exact: 8-bit integers times scales with 8 (bf16) or 24 (fp32) significant bits) and rounded once to
the scale's dtype. Scales are stored in the model dtype; :func:`quantize_for_export` rounds
quantkit's scales to it first, so both sides use the same scale. The transformers loader for
compressed-tensors (``from_pretrained``) must give the same dense weights, and for W8A16 the same
logits as quantkit's reference kernel.

Mutation tests corrupt an export (packing lane order, the +128 offset, the scale shape) and check
that the comparison fails, so the comparison is known to catch those mistakes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIGS, make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.core.calibration import collect_stats
from quantkit.core.modules import W8A8Linear, W8A16Linear
from quantkit.core.smoothquant import fold_pre_scales
from quantkit.formats.compressed_tensors import (
    pack_int8,
    quantize_for_export,
    save_compressed_tensors,
    unpack_int8,
)
from quantkit.formats.safetensors_io import CheckpointReader
from quantkit.kernels import force_backend
from quantkit.qmath import dequantize, sqnr_db

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (in the test extra)")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.utils.match import match_named_modules  # noqa: E402

CONFIGS = {
    "w8a8": QuantConfig(scheme="w8a8"),  # SmoothQuant per-token: run-time pre-scales get folded
    "w8a8-static": QuantConfig(scheme="w8a8", activations="per_tensor"),
    "w8a16": QuantConfig(scheme="w8a16"),
}
EXPORTABLE = sorted(a for a in TINY_CONFIGS if a != "gpt2")  # GPT-2's Conv1D: refused, tested below


def _stats(model):
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    return collect_stats(model, samples, quantkit.select_targets(model, QuantConfig()), progress=False)


def _quant_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W8A16Linear))}


def ct_decompress(path):
    """Parse config.json with compressed-tensors and decompress every layer it says is quantized.

    Layers are found the way compressed-tensors finds them in a model (targets minus ignore, on the
    model skeleton); each layer's tensors go through the registered compressor of its format.
    Returns ``(quantization config, {layer: decompressed state dict}, raw tensors)``.
    """
    from accelerate import init_empty_weights

    config = json.loads((path / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(config.pop("quantization_config"))
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    with CheckpointReader(path) as reader:  # one model.safetensors or shards and their index
        tensors = dict(reader.items())
    out = {}
    for scheme in qcfg.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        names = compressor.compression_param_names(scheme)
        for name, _ in match_named_modules(skeleton, scheme.targets, qcfg.ignore):
            out[name] = compressor.decompress({p: tensors[f"{name}.{p}"] for p in names}, scheme)
    return qcfg, out, tensors


def assert_matches_quantkit(path, model) -> None:
    """The export at ``path`` holds exactly ``model``'s quantized layers (see the module docstring)."""
    _, layers, tensors = ct_decompress(path)
    quant = _quant_modules(model)
    assert set(layers) == set(quant), "compressed-tensors finds other layers than quantkit quantized"
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, m in quant.items():
        scale = tensors[f"{name}.weight_scale"]
        assert scale.shape == (m.out_features, 1) and scale.dtype == dtype, name
        expected = dequantize(m.weight, m.weight_scale[:, None], dtype)
        got = layers[name]["weight"]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), f"{name}: decompressed weight differs from quantkit's"
        if isinstance(m, W8A16Linear):
            ints = unpack_from_int32(tensors[f"{name}.weight_packed"], 8, tensors[f"{name}.weight_shape"])
            assert torch.equal(ints, m.weight), name
        elif m.input_scale is not None:
            assert torch.equal(tensors[f"{name}.input_scale"].float(), m.input_scale.reshape(1)), name


def _export(arch, name, tmp_path, dtype=torch.bfloat16, **kw):
    model = make_tiny(arch).to(dtype)
    quantize_for_export(model, CONFIGS[name], _stats(model), progress=False)
    out = save_compressed_tensors(model, tmp_path / f"{arch}-{name}", **kw)
    return model, out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compressed_tensors_decompresses_to_quantkit_weights(tmp_path, name):
    for i, arch in enumerate(EXPORTABLE):
        sharded = i % 2 == 0  # every other architecture in Hugging Face shards of at most 16 KB
        model, out = _export(arch, name, tmp_path, **({"max_shard_size": "16KB"} if sharded else {}))
        assert (out / "model.safetensors.index.json").is_file() == sharded
        assert len(list(out.glob("model-*-of-*.safetensors"))) >= (3 if sharded else 0)
        assert_matches_quantkit(out, model)
        qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
        group = qcfg.config_groups["group_0"]
        assert qcfg.format == {"w8a16": "pack-quantized"}.get(name, "int-quantized")
        assert group.weights.strategy == "channel" and group.weights.num_bits == 8 and group.weights.symmetric
        acts = group.input_activations
        if name == "w8a16":
            assert acts is None
        else:
            static = name == "w8a8-static"
            assert acts.strategy == ("tensor" if static else "token") and acts.dynamic is not static
        assert "lm_head" in qcfg.ignore


def test_fp32_model_exports_fp32_scales_exactly(tmp_path):
    model, out = _export("llama", "w8a8", tmp_path, dtype=torch.float32)
    assert_matches_quantkit(out, model)


def test_transformers_loads_export_with_the_same_weights(tmp_path):
    """transformers' compressed-tensors loader (what from_pretrained uses) gives quantkit's weights,
    from one file or from shards."""
    for name in sorted(CONFIGS):
        model, out = _export("qwen3", name, tmp_path, **({"max_shard_size": "16KB"} if name == "w8a8" else {}))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():  # compressed-tensors decompresses on the first forward pass
            loaded(input_ids=torch.randint(0, 256, (1, 4)))
        for layer, m in _quant_modules(model).items():
            expected = dequantize(m.weight, m.weight_scale[:, None], torch.bfloat16)
            assert torch.equal(loaded.get_submodule(layer).weight, expected), (name, layer)


def test_w8a16_export_logits_equal_quantkit_reference(tmp_path):
    """Loaded by transformers + compressed-tensors, the W8A16 export computes quantkit's logits exactly."""
    model, out = _export("llama", "w8a16", tmp_path)
    quantkit.save(model, tmp_path / "quantkit-format")
    ours = quantkit.load(tmp_path / "quantkit-format")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), force_backend("reference"):
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_pre_scales_are_folded_and_function_is_preserved():
    """Folding the would-be run-time pre-scales into the producing layer leaves the float model's output as it was."""
    for arch in EXPORTABLE:
        model = make_tiny(arch)
        stats = _stats(model)
        # Skewed statistics make s far from 1, so a wrong row mapping (e.g. GQA heads) shows.
        stats = {k: v * (1 + 20 * torch.rand_like(v)) for k, v in stats.items()}
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        _, done = fold_pre_scales(model, quantkit.select_targets(model, QuantConfig()), stats, QuantConfig())
        with torch.no_grad():
            out = model(input_ids=ids).logits
        assert sqnr_db(ref, out) > 100, arch
        if not arch.startswith("falcon"):  # Falcon: GELU MLP, interleaved fused qkv: nothing to fold
            assert len(done) == 2 * model.config.num_hidden_layers, arch


def test_export_model_has_no_run_time_pre_scales_and_stays_accurate():
    for arch in EXPORTABLE:
        model = make_tiny(arch)
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        quantize_for_export(model, QuantConfig(), _stats(model), progress=False)
        assert all(m.smooth_inv is None for m in _quant_modules(model).values())
        with torch.no_grad():
            assert sqnr_db(ref, model(input_ids=ids).logits) > 18, arch  # the floor of test_quantize.py


def test_pack_int8_is_compressed_tensors_packing():
    torch.manual_seed(0)
    for cols in (4, 10, 64, 33):
        q = torch.randint(-127, 128, (5, cols), dtype=torch.int8)
        packed = pack_int8(q)
        assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 4))
        assert torch.equal(packed, pack_to_int32(q, 8))
        assert torch.equal(unpack_int8(packed, cols), q)


# ---- the comparison catches broken exports ---------------------------------------------------


def _rewrite(out, fn) -> None:
    f = out / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _reversed_lanes(q):
    u = q.to(torch.int64) + 128
    u = u.view(q.shape[0], -1, 4).flip(-1)
    word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _no_offset(q):
    u = q.to(torch.int64) & 0xFF  # two's complement bytes instead of q + 128
    u = u.view(q.shape[0], -1, 4)
    word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@pytest.mark.parametrize(
    "name,corrupt",
    [
        ("w8a16", lambda m, t, n: t.__setitem__(f"{n}.weight_packed", _reversed_lanes(m.weight))),
        ("w8a16", lambda m, t, n: t.__setitem__(f"{n}.weight_packed", _no_offset(m.weight))),
        ("w8a16", lambda m, t, n: t.__setitem__(f"{n}.weight_scale", t[f"{n}.weight_scale"][:, 0].contiguous())),
        ("w8a8", lambda m, t, n: t.__setitem__(f"{n}.weight_scale", t[f"{n}.weight_scale"][:, 0].contiguous())),
        ("w8a8", lambda m, t, n: t.__setitem__(f"{n}.weight", m.weight.T.contiguous())),
        ("w8a8", lambda m, t, n: t.__setitem__(f"{n}.weight_scale", t[f"{n}.weight_scale"].float())),
    ],
    ids=["lane-order", "offset", "w8a16-scale-shape", "w8a8-scale-shape", "transposed", "scale-dtype"],
)
def test_comparison_catches_broken_exports(tmp_path, name, corrupt):
    model, out = _export("llama", name, tmp_path)
    layer = "model.layers.0.self_attn.q_proj"  # square (64 x 64): a wrong scale shape still broadcasts
    _rewrite(out, lambda t: corrupt(model.get_submodule(layer), t, layer))
    with pytest.raises((AssertionError, RuntimeError)):
        assert_matches_quantkit(out, model)


# ---- what cannot be represented ---------------------------------------------------------------


def test_conv1d_models_are_refused_clearly():
    model = make_tiny("gpt2")
    with pytest.raises(QuantkitError, match="Conv1D"):
        quantize_for_export(model, QuantConfig(scheme="w8a16"), None, progress=False)


def test_run_time_pre_scales_are_refused(tmp_path):
    model = make_tiny("llama")
    config = QuantConfig(embeddings="float")
    quantkit.quantize(model, config, _stats(model), progress=False)  # o_proj/down_proj get smooth_inv
    with pytest.raises(QuantkitError, match="pre-scale"):
        save_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int8_embeddings_are_refused_and_export_keeps_them_float(tmp_path):
    model = make_tiny("opt")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)  # default: int8 embeddings
    with pytest.raises(QuantkitError, match="embeddings"):
        save_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = make_tiny("opt")
    quantize_for_export(model, QuantConfig(scheme="w8a16"), None, progress=False)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


# ---- the real default model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_float(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    stats = quantkit.calibrate(model, tok, n_samples=8, seq_len=256, progress=False)
    return model, tok, stats


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w8a8", "w8a16"])
def test_default_model_export_decompresses_exactly(default_float, tmp_path, name):
    model, tok, stats = default_float
    q = copy.deepcopy(model).to(torch.bfloat16)
    quantize_for_export(q, CONFIGS[name], stats, progress=False)
    out = save_compressed_tensors(q, tmp_path / name, tok)
    assert_matches_quantkit(out, q)
    assert len(_quant_modules(q)) == 7 * q.config.num_hidden_layers
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["ignore"] == ["lm_head"]
    if name == "w8a16":  # transformers + compressed-tensors compute quantkit's reference logits exactly
        quantkit.save(q, tmp_path / "quantkit-format")
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad(), force_backend("reference"):
            ours = quantkit.load(tmp_path / "quantkit-format")
            assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.slow
def test_default_model_w8a8_export_keeps_smoothquant_accuracy(default_float):
    """The export (pre-scales folded, bf16 scales) stays within SmoothQuant's 2% perplexity bar."""
    from quantkit.evaluation import measure as evaluate

    model, tok, stats = default_float
    batch = evaluate.windows(evaluate.eval_token_ids(tok), 512, 8)
    base = evaluate.perplexity(model, batch, progress=False)
    q = quantize_for_export(copy.deepcopy(model), CONFIGS["w8a8"], stats, progress=False)
    # Model in fp32: round the scales as a bf16 export does, to measure what the export holds.
    quantkit.formats.compressed_tensors.round_scales(q, torch.bfloat16)
    drift = 100 * (evaluate.perplexity(q, batch, progress=False) / base - 1)
    assert drift <= 2.0, drift


def test_mixed_w8a8_w8a16_export_is_two_config_groups_and_loads(tmp_path):
    """--max-drift keeps some layers W8A16 in a W8A8 model: the export names each group's layers in the
    mixed-precision format; compressed-tensors decompresses, and transformers loads, quantkit's weights."""
    model = make_tiny("qwen3").to(torch.bfloat16)
    names = quantkit.select_targets(model, CONFIGS["w8a8"])
    keep = {n for n in names if n.endswith(("down_proj", "k_proj"))}
    quantize_for_export(model, CONFIGS["w8a8"], _stats(model), w8a16=keep, progress=False)
    out = save_compressed_tensors(model, tmp_path / "mixed")
    assert_matches_quantkit(out, model)
    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qcfg.format == "mixed-precision"
    groups = {g.format: g for g in qcfg.config_groups.values()}
    assert set(groups["pack-quantized"].targets) == keep and groups["pack-quantized"].input_activations is None
    assert set(groups["int-quantized"].targets) == set(names) - keep
    assert groups["int-quantized"].input_activations.strategy == "token"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        loaded(input_ids=torch.randint(0, 256, (1, 4)))
    for layer, m in _quant_modules(model).items():
        expected = dequantize(m.weight, m.weight_scale[:, None], torch.bfloat16)
        assert torch.equal(loaded.get_submodule(layer).weight, expected), layer
