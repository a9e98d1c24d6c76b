"""``quantkit inspect``, ``quantize --format compressed-tensors`` and the HTML report, end to end on a tiny model."""

import html
import json
import re
import xml.etree.ElementTree as ET

import pytest
import transformers
from safetensors.torch import load_file, save_file

from quantkit.cli import main


def _quantize(model_dir, out, *extra):
    return main(["quantize", str(model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q", *extra])


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    assert _quantize(tiny_model_dir, root / "w8a8") == 0
    assert _quantize(tiny_model_dir, root / "w8a8-ct", "--format", "compressed-tensors") == 0
    assert _quantize(tiny_model_dir, root / "w8a16-ct", "--format", "compressed-tensors", "--scheme", "w8a16") == 0
    return root


def test_inspect_quantkit_checkpoint(checkpoints, capsys):
    assert main(["inspect", str(checkpoints / "w8a8")]) == 0
    out = capsys.readouterr().out
    assert "quantkit (format version 4), written by quantkit 0.1.0" in out  # 4: it records the alpha search
    assert re.search(r"W8A8 SmoothQuant a=auto \(0\.\d+\) per-token", out), out
    assert "quantized   14 linear layers (q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2" in out
    assert "skipped     0 linear layers" in out  # lm_head: int8 with the embeddings
    assert "embeddings  int8 (per-row scales): model.embed_tokens + lm_head; lm_head runs weight-only" in out
    assert "pre-scaled  4" in out  # o_proj and down_proj of both blocks: run-time SmoothQuant pre-scales
    assert "consistent  yes" in out
    assert main(["inspect", str(checkpoints / "w8a8"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["consistent"] and len(info["quantized"]) == 14 and info["skipped"] == []
    linears = sum(2 * 64 * n for n in (64, 32, 32, 64)) + 2 * 3 * 64 * 96
    vocab = json.loads((checkpoints / "w8a8" / "config.json").read_text())["vocab_size"]
    assert info["bytes"]["quantized_weights"] == linears + 2 * vocab * 64  # + untied embedding and lm_head


def test_inspect_compressed_tensors_exports(checkpoints, capsys):
    assert main(["inspect", str(checkpoints / "w8a8-ct")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors (int-quantized), written by quantkit 0.1.0" in out
    assert "W8A8: int8 per-channel weights, dynamic per-token int8 activations" in out
    assert "quantized   14 linear layers (q_proj x2, k_proj x2" in out and "consistent  yes" in out
    assert main(["inspect", str(checkpoints / "w8a16-ct")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors (pack-quantized)" in out and "consistent  yes" in out
    config = json.loads((checkpoints / "w8a16-ct" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["dtype"] == "bfloat16"


def test_inspect_finds_a_broken_checkpoint(checkpoints, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints / "w8a8", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:32]
    save_file(tensors, str(broken / "model.safetensors"))
    assert main(["inspect", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "consistent  NO" in out
    assert "up_proj: weight_scale is not fp32 [96]" in out and "q_proj: weight [32, 64]" in out


def test_inspect_rejects_float_models(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir)]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err


def test_export_refuses_conv1d_models_before_calibrating(tmp_path, tokenizer, capsys):
    gpt2 = tmp_path / "gpt2"
    transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    assert _quantize(gpt2, tmp_path / "out", "--format", "compressed-tensors") == 2
    assert "Conv1D" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    args = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32"]
    assert main([*args, "--windows", "2", "-q"]) == 0
    return out


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def test_run_writes_html_report_with_table_and_plots(tiny_run):
    page = (tiny_run / "report.html").read_text()
    svgs = _svgs(page)
    assert len(svgs) >= 3
    for svg in svgs:
        ET.fromstring(svg)  # each plot is well-formed SVG
    assert "<table>" in page and "<script" not in page and "http" not in page.replace('xmlns="http', "")
    assert "<caption>Accuracy and size</caption>" in page and "<caption>Speed and peak memory</caption>" in page
    for title in (
        "Perplexity vs checkpoint size",
        "Speed relative to bf16",
        "Per-layer output error",
        "alpha auto: calibration perplexity increase by alpha",
    ):
        assert title in page
    results = json.loads((tiny_run / "results.json").read_text())
    for variant in ("w8a16", "w8a8-naive", "w8a8-smoothquant-a0.5", "w8a8-smoothquant"):
        assert f"<td>{variant}<br>" in page
        row = next(r for r in results["rows"] if r["name"] == variant)
        layers = row["layer_sqnr_db"]
        assert len(layers) == 14 and all(10 < v < 200 for v in layers.values()), layers
    assert results["environment"]["cpu"] in page and html.escape(results["command"]) in page  # machine, command


def test_report_writes_markdown_and_html(tiny_run, tmp_path):
    rc = main(["report", str(tiny_run / "results.json"), "--out", str(tmp_path / "r.md"), "-q"])
    assert rc == 0
    md, page = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    assert "| w8a8-smoothquant |" in md
    assert len(_svgs(page)) >= 4 and page.count("<tr") >= 5 + 7  # 5 variants + provenance rows
    assert (
        main(
            [
                "report",
                str(tiny_run / "results.json"),
                "--out",
                str(tmp_path / "r.md"),
                "--html",
                str(tmp_path / "x.html"),
                "-q",
            ]
        )
        == 0
    )
    assert (tmp_path / "x.html").read_text().count("<svg") >= 3


def test_reports_without_speed_have_no_speed_columns(tiny_run, tmp_path):
    results = json.loads((tiny_run / "results.json").read_text())
    assert "prefill tok/s" in (tiny_run / "report.md").read_text()  # measured: the columns are there
    for row in results["rows"]:
        row.pop("speed", None)
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "r.md"), "-q"]) == 0
    md, page = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    for text in (md, page):
        assert "prefill tok/s" not in text and "decode tok/s" not in text and "checkpoint" in text
    assert "Speed: not measured" in md
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    row = next(line for line in md.splitlines() if line.startswith("| w8a16 |"))
    assert header.count("|") == row.count("|")  # as many cells as columns
