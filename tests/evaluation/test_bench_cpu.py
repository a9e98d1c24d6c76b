"""eval/bench_cpu.py on a tiny model: every row measured, graph rows replayed, llama.cpp ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "eval" / "bench_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeLlamaCpp:
    """Stands in for llama-cpp-python (not installed in CI): fixed speeds, the runner's interface."""

    def __init__(self, gguf, threads, context):
        self.info = {"gguf": str(gguf), "threads": threads, "context": context}

    def speed(self, ids, prefill_tokens, decode_tokens):
        return {
            "prefill_tokens": prefill_tokens,
            "prefill_tok_s": 100.0,
            "decode_tokens": decode_tokens,
            "decode_tok_s": 10.0,
        }


def test_bench_cpu_model_rows(bench, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "LlamaCpp", _FakeLlamaCpp)
    out = tmp_path / "bench.json"
    args = ["--model", str(tiny_model_dir), "--skip-layers", "--rounds", "1", "--prefill-tokens", "32"]
    assert bench.main([*args, "--llama-cpp", str(tmp_path / "m.gguf"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["model"]["rows"]
    assert list(rows) == ["fp32", "bf16", "w8a16", "w8a8", "bf16 graph", "w8a16 graph", "w8a8 graph", "llama.cpp q8_0"]
    for name, r in rows.items():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0, name
        assert r["decode_tok_s_x_llama_cpp"] == pytest.approx(r["decode_tok_s"] / 10.0)
        assert r["decode_tok_s_x_bf16"] == pytest.approx(r["decode_tok_s"] / rows["bf16"]["decode_tok_s"])
        if name.endswith("graph"):
            assert r["decode_method"] == "cpu_graph" and 0 < r["capture_seconds"] < 60
            assert r["peak_memory_bytes"] is None
    assert rows["w8a8"]["peak_memory_bytes"] > 0  # eager rows: measured in a fresh process
    printed = capsys.readouterr().out
    assert "decode x llama.cpp" in printed and "CPU graph capture" in printed


def test_llama_cpp_needs_its_package_and_file(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(SystemExit, match="llama-cpp-python"):
        bench.LlamaCpp(tmp_path / "m.gguf", 2, 64)


def test_bench_decode_batch_smoke(tmp_path, capsys):
    from tiny_models import make_lively

    import quantkit

    spec = importlib.util.spec_from_file_location("bench_decode_batch", BENCH.parent / "bench_decode_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    quantkit.save(make_lively("llama", "w8a16"), tmp_path / "ck")
    out = tmp_path / "batch.json"
    args = [str(tmp_path / "ck"), "--batch-sizes", "1,3", "--prompt-tokens", "4", "--tokens", "4", "--repeats", "1"]
    assert module.main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert all(r["eager_tok_s"] > 0 and r["graph_tok_s"] > 0 and r["graph_method"] == "cpu_graph" for r in rows)
    assert "batch 3:" in capsys.readouterr().out
