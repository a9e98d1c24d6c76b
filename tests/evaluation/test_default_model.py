"""Integration test on the real default model (SmolLM2-135M-Instruct): the accuracy bars of the brief.

Protocol: the README's perplexity protocol exactly (32 evenly spaced non-overlapping 512-token
windows of Emma, fp32 activations); calibration is the shipped default (16 x 512 tokens of
Persuasion), which never overlaps the evaluation text. Peak memory follows quantkit.evaluation.measure's
protocol (fresh process per model), with fewer decode steps.
"""

import copy

import pytest
import torch
import transformers

import quantkit
from quantkit.evaluation import measure as evaluate
from quantkit.evaluation.default_job import DEFAULT_VARIANTS
from quantkit.evaluation.pipeline import quantize_to_disk

pytestmark = pytest.mark.slow
WINDOWS = 32


@pytest.fixture(scope="module")
def measured(default_model_dir, tmp_path_factory):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    batch = evaluate.windows(evaluate.eval_token_ids(tok), 512, WINDOWS)
    stats = quantkit.calibrate(model, tok, progress=False)
    results = {"float": evaluate.perplexity(model, batch, progress=False)}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    results["bf16_linear_bytes"] = evaluate.weight_bytes(bf16)["linear"]
    results["bf16_total_bytes"] = evaluate.weight_bytes(bf16)["total"]
    models = {}
    for name, config in DEFAULT_VARIANTS.items():
        if config.auto_alpha:  # chosen by quantizing at each candidate: the layer-by-layer pipeline
            path = quantize_to_disk(default_model_dir, tmp_path_factory.mktemp("auto") / name, config, progress=False)
            q = quantkit.load(path, dtype=torch.float32)
            results[f"{name}_alpha"] = quantkit.read_record(path).alpha_search["chosen"]
        else:
            q = quantkit.quantize(copy.deepcopy(model), config, stats, progress=False)
        results[name] = evaluate.perplexity(q, batch, progress=False)
        models[name] = q
    out = tmp_path_factory.mktemp("ck") / "w8a8"
    quantkit.save(models["w8a8-smoothquant"].to(torch.bfloat16), out, tok)
    results["bytes"] = {n: evaluate.weight_bytes(m)["quantized_linear"] for n, m in models.items()}
    results["total_bytes"] = {n: evaluate.weight_bytes(m)["total"] for n, m in models.items()}
    return results, out, tok


def _drift(results, name):
    return 100 * (results[name] / results["float"] - 1)


def test_w8a16_drift_at_most_half_percent(measured):
    results, _, _ = measured
    assert _drift(results, "w8a16") <= 0.5


def test_smoothquant_w8a8_drift_at_most_two_percent_and_clearly_below_naive(measured):
    results, _, _ = measured
    sq, naive = _drift(results, "w8a8-smoothquant"), _drift(results, "w8a8-naive")
    assert sq <= 2.0
    # "clearly below": smoothing removes at least a third of naive W8A8's drift
    assert sq < naive * 2 / 3, (sq, naive)


def test_auto_alpha_drift_at_most_0_8_percent_and_below_the_fixed_alpha(measured):
    """alpha chosen on the calibration text (Persuasion) alone; drift measured on Emma."""
    results, _, _ = measured
    auto, fixed = _drift(results, "w8a8-smoothquant"), _drift(results, "w8a8-smoothquant-a0.5")
    assert DEFAULT_VARIANTS["w8a8-smoothquant"].auto_alpha
    assert auto <= 0.8 and auto < fixed, (auto, fixed, results["w8a8-smoothquant_alpha"])


def test_quantized_linear_weights_at_most_53_percent_of_bf16(measured):
    results, _, _ = measured
    for name, nbytes in results["bytes"].items():
        assert nbytes <= 0.53 * results["bf16_linear_bytes"], name


def test_all_weights_about_half_of_bf16_with_int8_embeddings(measured):
    """The default stores the tied embedding/lm_head int8 too: every matrix is int8 (+ scales)."""
    results, _, _ = measured
    for name, nbytes in results["total_bytes"].items():
        assert nbytes <= 0.52 * results["bf16_total_bytes"], name


def test_w8a8_peak_memory_while_generating_at_most_60_percent_of_bf16(measured, default_model_dir):
    _, path, tok = measured
    prompt = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids[0]
    kw = {"dtype": "bfloat16", "prompt": prompt, "decode_tokens": 8}
    bf16 = evaluate.peak_memory(default_model_dir, kind="float", **kw)
    w8a8 = evaluate.peak_memory(path, kind="quantized", **kw)
    if bf16 is None or w8a8 is None:
        pytest.skip("peak memory is measured on Linux only")
    assert w8a8["peak_memory_bytes"] <= 0.60 * bf16["peak_memory_bytes"], (w8a8, bf16)


def test_w8a8_checkpoint_generates_coherent_text(measured):
    _, path, tok = measured
    model = quantkit.load(path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, quantkit.core.modules.W8A8Linear)
    answers = {"The capital of France is": "Paris", "The first man to walk on the moon was": "Armstrong"}
    for prompt, expected in answers.items():
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        assert expected in tok.decode(out[0, ids.shape[1] :]), prompt
