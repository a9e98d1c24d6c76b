"""Layer-by-layer quantization (quantkit.core.sequential) against whole-model quantization."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from tiny_models import TINY_CONFIGS, make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.core.calibration import collect_stats
from quantkit.core.search import CLIP_GRID
from quantkit.core.sequential import collect_stats_layerwise, decoder_stack, quantize_layerwise

CONFIGS = {
    "w8a8-sq": QuantConfig(scheme="w8a8"),
    "w8a8-static": QuantConfig(scheme="w8a8", activations="per_tensor"),
    "w8a16": QuantConfig(scheme="w8a16"),
}


def _skeleton(config: transformers.PretrainedConfig) -> torch.nn.Module:
    with init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)


def _layerwise(float_model, config, samples, **kw) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    emitted: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def emit(prefix, module):
        order.append(prefix)
        for k, v in module.state_dict().items():
            if v is not None and not v.is_meta:
                emitted[prefix + k] = v.clone()

    skeleton = _skeleton(float_model.config)
    out = quantize_layerwise(
        skeleton, state.__getitem__, config, samples=samples, dtype=torch.bfloat16, emit=emit, progress=False, **kw
    )
    return out, emitted, order


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layerwise_with_float_propagation_equals_whole_model_bit_for_bit(tiny_arch, name):
    config = CONFIGS[name]
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (3, 12))
    whole = make_tiny(tiny_arch)
    stats = collect_stats(whole, samples, quantkit.select_targets(whole, config), progress=False)
    layerwise, emitted, order = _layerwise(make_tiny(tiny_arch), config, samples, propagate="float")

    whole.to(torch.bfloat16)
    quantkit.quantize(whole, config, stats, progress=False)
    expected = {k: v for k, v in whole.state_dict().items() if v is not None}
    assert set(emitted) == set(expected)
    for k, v in expected.items():
        if k.endswith("input_scale"):  # static scales: a searched fraction of the abs-max the whole model uses
            ratio = float(emitted[k] / v)
            assert any(ratio == pytest.approx(c, rel=1e-5) for c in CLIP_GRID), (k, ratio)
            continue
        assert emitted[k].dtype == v.dtype and torch.equal(emitted[k], v), k
    assert layerwise.config.quantization_config == whole.config.quantization_config
    stack_name, stack = decoder_stack(whole)
    layers = [f"{stack_name}.{i}." for i in range(len(stack))]
    record = whole.config.quantization_config
    if record["input_embedding"] and not record["tied_embeddings"]:  # written and freed before the layers
        assert order == [record["input_embedding"] + ".", *layers, ""]
    else:
        assert order == [*layers, ""]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_layerwise_with_saved_statistics_equals_whole_model(arch):
    """Statistics recorded beforehand (quantkit calibrate --out, then --stats) are used as they are."""
    torch.manual_seed(1)
    config = QuantConfig(scheme="w8a8")
    whole = make_tiny(arch)
    stats = collect_stats(whole, torch.randint(0, 256, (3, 12)), quantkit.select_targets(whole, config), progress=False)
    _, emitted, _ = _layerwise(make_tiny(arch), config, None, stats=stats)
    quantkit.quantize(whole.to(torch.bfloat16), config, stats, progress=False)
    for k, v in whole.state_dict().items():
        assert torch.equal(emitted[k], v), k


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "phi3"])
def test_output_projection_quantized_from_row_blocks_is_the_same(arch):
    """An untied lm_head quantized from blocks of rows read one at a time equals the one quantized whole."""
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (2, 8))
    config = QuantConfig(scheme="w8a8")
    model = make_tiny(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    asked = []

    def rows(name, start, stop):
        asked.append((name, start, stop))
        return state[name][start:stop]

    _, whole, _ = _layerwise(make_tiny(arch), config, samples)
    _, blocks, _ = _layerwise(make_tiny(arch), config, samples, read_rows=rows)
    assert set(whole) == set(blocks) and all(torch.equal(whole[k], blocks[k]) for k in whole)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert bool(asked) is not tied  # a tied table is the input embedding's: nothing to read


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_propagation_runs_on_every_architecture(tiny_arch, name):
    """The default propagation runs each quantized layer on fp32 activations, whatever its norms."""
    torch.manual_seed(1)
    out, emitted, _ = _layerwise(make_tiny(tiny_arch), CONFIGS[name], torch.randint(0, 256, (2, 8)))
    assert set(out.config.quantization_config["modules"]) <= {k.rpartition(".")[0] for k in emitted}


def test_quantized_propagation_calibrates_later_layers_on_quantized_inputs():
    """With the default propagation the second layer's statistics come from the quantized first
    layer: its smoothed weights differ from float propagation's, and the first layer's do not."""
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (3, 12))
    config = QuantConfig(scheme="w8a8")
    _, as_float, _ = _layerwise(make_tiny("llama"), config, samples, propagate="float")
    _, as_quant, _ = _layerwise(make_tiny("llama"), config, samples)
    first = "model.layers.0.self_attn.q_proj.weight"
    second = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(as_float[first], as_quant[first])
    assert not torch.equal(as_float[second], as_quant[second])


def test_layerwise_model_runs_after_loading_its_tensors():
    """What emit receives is a complete quantized model: put it in a fresh skeleton and it computes
    logits close to the float model's."""
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (4, 16))
    float_model = make_tiny("qwen2")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = float_model(input_ids=ids).logits
    out, emitted, _ = _layerwise(float_model, QuantConfig(scheme="w8a8"), samples)
    qc = out.config.quantization_config
    cfg = copy.deepcopy(float_model.config)
    cfg.tie_word_embeddings = out.config.tie_word_embeddings
    model = _skeleton(cfg)
    from quantkit.core.record import QuantRecord
    from quantkit.formats.native import swap_in_empty_modules

    swap_in_empty_modules(model, QuantRecord.from_dict(qc), set(emitted), torch.bfloat16)
    model.load_state_dict(emitted, strict=False, assign=True)
    model.tie_weights()
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    with torch.no_grad():
        got = model.to(torch.bfloat16)(input_ids=ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_missing_source_tensor_is_a_clear_error():
    model = make_tiny("llama")
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(QuantkitError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        quantize_layerwise(
            _skeleton(model.config),
            state.__getitem__,
            QuantConfig(scheme="w8a16"),
            emit=lambda p, m: None,
            progress=False,
        )


def test_every_tiny_architecture_has_a_decoder_stack():
    for arch in TINY_CONFIGS:
        _, stack = decoder_stack(make_tiny(arch))
        assert len(stack) == 2, arch


def test_layerwise_calibration_equals_whole_model_calibration_bit_for_bit(tiny_arch):
    """What ``quantkit calibrate`` saves, one layer in memory at a time: the whole model's statistics."""
    config = QuantConfig()
    torch.manual_seed(1)
    samples = torch.randint(0, 256, (3, 12))
    whole = make_tiny(tiny_arch)
    expected = collect_stats(whole, samples, quantkit.select_targets(whole, config), progress=False)
    state = {k: v.clone() for k, v in make_tiny(tiny_arch).state_dict().items()}
    stats = collect_stats_layerwise(_skeleton(whole.config), state.__getitem__, config, samples, progress=False)
    assert stats.keys() == expected.keys()
    for name, amax in expected.items():
        assert torch.equal(stats[name], amax), name
