"""StaticDecoder (static KV cache; CUDA graphs on GPU) and the model-level GPU benchmark script.

The decoder's contract is token equality with ``model.generate(do_sample=False)``: greedy decoding
is deterministic, so any error in the cache, the positions or the buffer updates shows up as a
different token. The models are ``make_lively`` ones (see ``test_comparison_detects_a_position_error``).
On CPU the decode steps are replays of a recorded CPU graph (tests/evaluation/test_cpu_graph.py
compares them with the eager step); the CUDA graph tests replay the same step and skip without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_lively, make_tiny

import quantkit
from quantkit.evaluation.fastgen import StaticDecoder, cache_supports_graphs, generate_greedy
from quantkit.evaluation.speed import time_decode, time_prefill

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT_LEN = 7
NEW_TOKENS = 16
BENCH = Path(__file__).resolve().parents[2] / "eval" / "bench_model_gpu.py"
TINY_BENCH_ARGS = [
    "--device", "cpu", "--layers", "1", "--hidden-size", "64", "--intermediate-size", "128",
    "--heads", "4", "--kv-heads", "2", "--vocab-size", "256", "--prefill-tokens", "32",
    "--prompt-tokens", "8", "--decode-tokens", "8", "--repeats", "1",
    "--calib-samples", "2", "--calib-tokens", "16",
]  # fmt: skip
# Published parameter count of Llama-3-8B.
LLAMA3_8B_PARAMS = 8_030_261_248


def _tiny(arch: str = "llama", scheme: str | None = None) -> torch.nn.Module:
    return make_lively(arch, scheme)


def _prompt(batch: int = 1, seed: int = 1, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int = NEW_TOKENS) -> torch.Tensor:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,  # StaticDecoder never stops early; neither must the reference
    )
    assert out.shape == (ids.shape[0], ids.shape[1] + n)
    return out


# ----------------------------------------------------------------------------------------------
# Token equality with Hugging Face generate (CPU: the eager version of the captured step)
# ----------------------------------------------------------------------------------------------


def test_greedy_matches_generate_float(tiny_arch):
    model = _tiny(tiny_arch)
    ids = _prompt(batch=2)
    assert torch.equal(generate_greedy(model, ids, NEW_TOKENS), _hf_greedy(model, ids))


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_greedy_matches_generate_quantized(arch, scheme):
    model = _tiny(arch, scheme)
    ids = _prompt(batch=2)
    assert torch.equal(generate_greedy(model, ids, NEW_TOKENS), _hf_greedy(model, ids))


def test_comparison_detects_a_position_error():
    # The equality tests have power: tokens vary along the sequence, and the classic static-cache
    # bugs (rotary positions one off; a cache not emptied between sequences) change them.
    model = _tiny("llama")
    ids = _prompt()
    ref = _hf_greedy(model, ids)
    assert len(set(ref[0, PROMPT_LEN:].tolist())) >= NEW_TOKENS // 2

    decoder = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS)
    forward = decoder._forward
    # Decode steps one position ahead of the prompt (a uniform shift would be harmless: RoPE is relative).
    decoder._forward = lambda ids, positions, **kw: forward(ids, positions + (ids.shape[1] == 1), **kw)
    assert not torch.equal(decoder.generate(ids, NEW_TOKENS), ref)

    decoder = StaticDecoder(model, 2 * PROMPT_LEN + NEW_TOKENS)
    decoder.prefill(_prompt(seed=5))
    decoder.prefill(ids, reset=False)  # the first sequence is still in the cache
    decoder.decode(NEW_TOKENS - 1)
    assert not torch.equal(decoder.tokens(), ref)


def test_prefill_decode_api_and_reuse():
    model = _tiny("llama", "w8a16")
    first, second = _prompt(seed=1), _prompt(seed=5)
    ref_first, ref_second = _hf_greedy(model, first), _hf_greedy(model, second)
    decoder = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS)

    token = decoder.prefill(first)
    assert token.shape == (1,) and token.item() == ref_first[0, PROMPT_LEN].item()
    assert torch.equal(decoder.tokens(), ref_first[:, : PROMPT_LEN + 1])
    decoder.decode(3)
    decoder.decode(2)
    assert torch.equal(decoder.tokens(), ref_first[:, : PROMPT_LEN + 6])

    # A new sequence in the same buffers (the cache is reset in place), then the first again.
    assert torch.equal(decoder.generate(second, NEW_TOKENS), ref_second)
    assert torch.equal(decoder.generate(first, NEW_TOKENS), ref_first)


def test_shape_and_capacity_errors():
    model = _tiny("llama")
    decoder = StaticDecoder(model, max_len=10)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.decode(1)
    with pytest.raises(ValueError, match="max_len"):
        decoder.prefill(_prompt(length=10))
    with pytest.raises(ValueError, match=r"\[1, n\]"):
        decoder.prefill(_prompt(batch=2))
    decoder.prefill(_prompt(length=5))  # 6 tokens held
    decoder.decode(4)  # 10: full
    with pytest.raises(ValueError, match="exceed max_len"):
        decoder.decode(1)
    with pytest.raises(ValueError, match="exceed max_len"):
        decoder.generate(_prompt(length=5), 6)
    with pytest.raises(ValueError, match="max_len"):
        StaticDecoder(model, max_len=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            StaticDecoder(model, max_len=10, cuda_graph=True)


@pytest.mark.parametrize(
    ("arch", "graphable"), [("llama", True), ("gpt2", True), ("mistral", False), ("gemma2", False)]
)
def test_only_full_attention_static_caches_are_captured(arch, graphable):
    # Sliding-window static layers keep a Python int that a replayed graph would never update.
    decoder = StaticDecoder(make_tiny(arch), max_len=16)
    assert cache_supports_graphs(decoder.cache) is graphable
    assert not decoder.uses_cuda_graph  # CPU model: always eager


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


class _ForwardLog:
    """Records the query length of every model forward; optionally sleeps in prefill forwards."""

    def __init__(self, model: torch.nn.Module, prefill_sleep_s: float = 0.0):
        self.lengths: list[int] = []
        self.sleep = prefill_sleep_s
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        n = kwargs["input_ids"].shape[1]
        self.lengths.append(n)
        if n > 1 and self.sleep:
            time.sleep(self.sleep)


def test_timing_helpers_time_what_they_claim():
    model = _tiny("llama", "w8a8")
    sleep = 0.3
    log = _ForwardLog(model, prefill_sleep_s=sleep)

    prefill = time_prefill(model, 16, repeats=2)
    assert log.lengths == [16] * 3  # warm-up + 2 timed forwards, nothing else
    assert prefill.tokens == 16 and len(prefill.samples) == 2 and prefill.method == "cpu"
    assert prefill.seconds >= sleep  # the prefill forward is inside the timed region
    assert prefill.tokens_per_s == pytest.approx(16 / prefill.seconds)

    log.lengths.clear()
    decode = time_decode(model, 5, prompt_len=4, batch_size=2, repeats=2, cpu_graph=False)
    assert log.lengths == ([4] + [1] * 5) * 3  # per run: one prefill, then 5 single-token steps
    assert decode.tokens == 10 and len(decode.samples) == 2 and decode.method == "cpu"
    assert 0 < decode.seconds < sleep  # the (slow) prefill is outside the timed region

    # Replayed steps never enter the Python forward: only the capture's throw-away sequence (one
    # prompt token, two recorded steps) and the three prefills do.
    log.lengths.clear()
    decode = time_decode(model, 5, prompt_len=4, batch_size=2, repeats=2)
    assert log.lengths == [1, 1, 1] + [4] * 3
    assert decode.tokens == 10 and len(decode.samples) == 2 and decode.method == "cpu_graph"
    assert 0 < decode.seconds < sleep
    log.handle.remove()


def test_timing_helpers_use_a_given_prompt():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="fewer"):
        time_prefill(model, 16, prompt=torch.arange(8), repeats=1)
    assert time_decode(model, 2, prompt_len=8, prompt=torch.arange(8), repeats=1).seconds > 0


# ----------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ----------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [None, "w8a16", "w8a8"])
def test_cuda_graph_decode_matches_eager(scheme):
    model = _tiny("llama", scheme).cuda()
    ids = _prompt(batch=2).cuda()
    eager = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS, batch_size=2, cuda_graph=False)
    graphed = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS, batch_size=2)
    assert graphed.uses_cuda_graph
    want = eager.generate(ids, NEW_TOKENS)
    assert torch.equal(graphed.generate(ids, NEW_TOKENS), want)
    assert graphed._graph is not None
    assert torch.equal(graphed.generate(ids, NEW_TOKENS), want)  # replayed again after a reset
    # Equality with Hugging Face's generate is the CPU tests' job: on the GPU, SDPA may pick another
    # kernel for the masked static cache than for the dynamic one, so float rounding may differ.
    timing = time_decode(model, 8, prompt_len=8, repeats=2)
    assert timing.method == "cuda_graph" and timing.seconds > 0


# ----------------------------------------------------------------------------------------------
# eval/bench_model_gpu.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_smoke(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main([*TINY_BENCH_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU SMOKE RUN" in printed and "NOT GPU results" in printed
    report = json.loads(out.read_text())
    assert report["smoke_test_not_gpu_results"] is True
    assert list(report["results"]) == ["bf16", "w8a16", "w8a8"]
    base = report["results"]["bf16"]["weight_bytes"]
    for scheme, r in report["results"].items():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_timing"] == "cpu_graph"
        assert (r["weight_bytes"] < base) is (scheme != "bf16")
    assert "statistics from 2x16 random tokens" in report["results"]["w8a8"]["how"]
    assert all(a["passed"] is None for a in report["acceptance"])  # CPU figures are never judged


def test_bench_meta_counts_llama3_8b_bytes(bench, tmp_path):
    out = tmp_path / "meta.json"
    assert bench.main(["--device", "meta", "--schemes", "bf16,w8a16", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    # bf16 parameters of the real Llama-3-8B, plus the rotary inv_freq buffers (a few hundred bytes).
    assert 0 <= results["bf16"]["weight_bytes"] - 2 * LLAMA3_8B_PARAMS < 4096
    assert "prefill_tok_s" not in results["bf16"]
    # Every matrix int8 (+ fp32 scales), the default: just over half, the norms aside.
    assert 0.5 < results["w8a16"]["vs_bf16"]["weight_bytes"] < 0.502
    out = tmp_path / "meta-float.json"
    assert bench.main(["--device", "meta", "--schemes", "bf16,w8a16", "--embeddings", "float", "--out", str(out)]) == 0
    # int8 linears (+ fp32 scales) with embedding and lm_head still bf16.
    assert 0.55 < json.loads(out.read_text())["results"]["w8a16"]["vs_bf16"]["weight_bytes"] < 0.6


def test_bench_acceptance_is_judged_only_on_cuda(bench):
    results = {
        "bf16": {"prefill_tok_s": 100.0, "decode_tok_s": 50.0, "weight_bytes": 100},
        "w8a16": {"prefill_tok_s": 90.0, "decode_tok_s": 85.0, "weight_bytes": 54},
        "w8a8": {"prefill_tok_s": 120.0, "decode_tok_s": 60.0, "weight_bytes": 56},
    }
    bench.add_ratios(results)
    verdicts = {(a["scheme"], a["metric"]): a["passed"] for a in bench.acceptance(results, torch.device("cuda"))}
    assert verdicts == {
        ("w8a16", "decode_tok_s"): True,  # 1.70 >= 1.6
        ("w8a8", "prefill_tok_s"): False,  # 1.20 < 1.25
        ("w8a16", "weight_bytes"): True,  # 0.54 <= 0.55
        ("w8a8", "weight_bytes"): False,  # 0.56 > 0.55
    }
    assert all(a["passed"] is None for a in bench.acceptance(results, torch.device("cpu")))


def test_profile_cpu_decode_smoke(tmp_path, capsys):
    """eval/profile_cpu_decode.py runs on a quantized checkpoint and splits the step into its parts."""
    spec = importlib.util.spec_from_file_location("profile_cpu_decode", BENCH.parent / "profile_cpu_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = _tiny("llama", "w8a8")
    quantkit.save(model, tmp_path / "ck")
    for flags, how in (([], "CPU graph replay"), (["--eager"], "eager forward")):
        assert module.main([str(tmp_path / "ck"), "--prompt-tokens", "4", "--tokens", "4", *flags]) == 0
        out = capsys.readouterr().out
        linear = float(out.split("quantized linears")[1].split(":")[1].split("ms")[0])
        # The fused calls are counted both ways: as dispatcher ops in a replay, by module ranges eagerly.
        assert f"decode ({how}" in out and linear > 0
