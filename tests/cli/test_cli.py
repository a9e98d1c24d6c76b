"""The command line end to end on a tiny model, and every bad input the brief names."""

import json

import pytest
import transformers

from quantkit.cli import main


@pytest.fixture
def calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("It was a truth universally acknowledged. " * 200)
    return f


def _quantize(model_dir, out, *extra):
    return main(["quantize", str(model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q", *extra])


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "quantize", "calibrate", "eval", "report"):
        assert cmd in out


def test_quantize_eval_report_end_to_end(tmp_path, tiny_model_dir, calib_file):
    assert _quantize(tiny_model_dir, tmp_path / "w8a8", "--calibration", str(calib_file)) == 0
    assert _quantize(tiny_model_dir, tmp_path / "w8a16", "--scheme", "w8a16") == 0
    cfg = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantkit" and cfg["scheme"] == "w8a8" and len(cfg["modules"]) == 14
    text = tmp_path / "eval.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 100)
    rc = main(
        [
            "eval",
            str(tmp_path / "w8a8"),
            str(tmp_path / "w8a16"),
            "--baseline",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "r.json"),
            "--text",
            str(text),
            "--windows",
            "2",
            "--window",
            "64",
            "-q",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["float (float32)", "float (bfloat16)", "w8a8", "w8a16"]
    for r in results["rows"]:
        assert r["perplexity"] > 1 and r["speed"]["decode_tok_s"] > 0
        # Decode is timed as quantkit serves it: CPU-graph replays, baselines included.
        assert r["speed"]["method"] == "cpu_graph" and 0 < r["speed"]["capture_seconds"] < 60
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "report.md"), "-q"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| w8a8 |" in md and "| w8a16 |" in md and "drift" in md
    assert "decode with a static KV cache, each step a replayed CPU graph, captured once" in md


def test_calibrate_then_reuse_stats(tmp_path, tiny_model_dir, calib_file):
    stats = tmp_path / "stats.safetensors"
    assert (
        main(
            [
                "calibrate",
                str(tiny_model_dir),
                "--out",
                str(stats),
                "--calibration",
                str(calib_file),
                "--samples",
                "2",
                "--seq-len",
                "32",
                "-q",
            ]
        )
        == 0
    )
    assert _quantize(tiny_model_dir, tmp_path / "q", "--stats", str(stats), "--activations", "per_tensor") == 0


# ---- bad input: one-line error, exit 2, nothing written -------------------------------------


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("quantkit: error: ")
    return err[-1]


def test_missing_model(tmp_path, capsys):
    assert _quantize(tmp_path / "nope", tmp_path / "out") == 2
    assert "not found" in _error(capsys)
    assert main(["quantize", "meta-llama/Llama-3-8B", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "offline" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_not_a_causal_lm(tmp_path, capsys):
    t5 = tmp_path / "t5"  # encoder-decoder: not loadable as a causal LM
    transformers.T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=32).save_pretrained(t5)
    assert _quantize(t5, tmp_path / "out") == 2
    assert "not a causal language model" in _error(capsys)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "no text"),
        (b"  \n\n ", "no text"),
        (b"caf\xe9 au lait", "not UTF-8"),
        (b'{"txt": 1}\n', 'no string \\"text\\" field'),
    ],
)
def test_bad_calibration_text(tmp_path, tiny_model_dir, capsys, content, expected):
    f = tmp_path / ("calib.jsonl" if content.startswith(b"{") else "calib.txt")
    f.write_bytes(content)
    assert _quantize(tiny_model_dir, tmp_path / "out", "--calibration", str(f)) == 2
    assert expected.replace("\\", "") in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 2
    assert "--overwrite" in _error(capsys)
    assert (out / "keep.txt").read_text() == "precious"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_run_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from quantkit.formats.shard_writer import ShardWriter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_write_shard", interrupted)
    assert _quantize(tiny_model_dir, tmp_path / "out", "--scheme", "w8a16") == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output folder, no .partial folder


def test_interrupted_overwrite_keeps_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    from quantkit.formats.shard_writer import ShardWriter

    out = tmp_path / "out"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 0
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(ShardWriter, "_write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16", "--overwrite") == 130
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_report_rejects_foreign_json(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text("{}")
    assert main(["report", str(f), "--out", str(tmp_path / "r.md")]) == 2
    assert "not a quantkit results file" in _error(capsys)


def test_cli_embeddings_flag(tmp_path, tiny_model_dir):
    for choice in ("int8", "float"):
        out = tmp_path / choice
        args = ["quantize", str(tiny_model_dir), "--out", str(out), "--scheme", "w8a16", "--embeddings", choice]
        assert main([*args, "-q"]) == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["embeddings"] == choice and bool(qc["input_embedding"]) is (choice == "int8")


def test_quantize_to_disk_rejects_an_unknown_format_before_loading(tmp_path):
    from quantkit.config import QuantConfig
    from quantkit.errors import QuantkitError
    from quantkit.evaluation.pipeline import quantize_to_disk

    with pytest.raises(QuantkitError, match="unknown checkpoint format 'compressed_tensors'"):
        quantize_to_disk(tmp_path / "no-model", tmp_path / "out", QuantConfig(), fmt="compressed_tensors")
    assert list(tmp_path.iterdir()) == []
