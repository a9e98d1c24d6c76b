"""``quantkit eval`` of compressed-tensors exports (what vLLM serves), beside quantkit's own checkpoints."""

import json
import math

import pytest

from quantkit.cli import main
from quantkit.evaluation import pipeline
from quantkit.evaluation.report_md import read_results, write_markdown

COMMON = ["--samples", "2", "--seq-len", "32", "--alpha", "0.5", "-q"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name, extra in {
        "w8a8": ["--scheme", "w8a8"],
        "w8a8-ct": ["--scheme", "w8a8", "--format", "compressed-tensors"],
        "w8a16-ct": ["--scheme", "w8a16", "--format", "compressed-tensors"],
    }.items():
        assert main(["quantize", str(tiny_model_dir), "--out", str(root / name), *COMMON, *extra]) == 0
        made[name] = root / name
    return made


@pytest.fixture
def eval_text(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 80)
    return f


def _eval(cks, baseline, out, text, *extra):
    args = ["eval", *map(str, cks), "--baseline", str(baseline), "--out", str(out), "--text", str(text)]
    return main([*args, "--windows", "2", "--window", "32", "--no-speed", "-q", *extra])


def test_exports_are_measured_beside_quantkits_own_format(checkpoints, tiny_model_dir, eval_text, tmp_path):
    out = tmp_path / "r.json"
    assert _eval(checkpoints.values(), tiny_model_dir, out, eval_text) == 0
    results = json.loads(out.read_text())
    rows = {r["name"]: r for r in results["rows"]}
    features = results["environment"]["cpu_features"]  # every figure says what the CPU offered the kernels
    assert features["torch_cpu_capability"] and isinstance(features["flags"], list)
    assert features["int8_gemv"] in ("vnni", "avx2", "", None)
    own, ct, ct16 = rows["w8a8"], rows["w8a8-ct"], rows["w8a16-ct"]
    assert "format" not in own
    for r in (ct, ct16):
        assert r["format"] == "compressed-tensors" and r["loaded_by"].startswith("transformers ")
        assert math.isfinite(r["perplexity"]) and "speed" not in r
        assert r["config"]["tool_version"]  # the quantkit record the export was made with
        # bytes of the int8 files, not of the float weights transformers decompressed them to
        assert r["weight_bytes"]["quantized_linear"] < rows["float (float32)"]["weight_bytes"]["linear"] / 3
        assert len(r["layer_sqnr_db"]) == 14  # every quantized linear, as transformers runs it
    assert "127.5" in ct["note"] and "exactly" in ct16["note"]
    # The same tiny model, quantized the same way: the export is close to quantkit's own W8A8 (pre-scales
    # folded and bf16 scales, and transformers' float simulation of int8 activations) but not identical.
    assert ct["perplexity"] != own["perplexity"]
    assert abs(ct["perplexity"] / own["perplexity"] - 1) < 0.05
    md = tmp_path / "r.md"
    write_markdown(read_results([out]), md)
    text = md.read_text()
    assert "w8a8-ct: compressed-tensors export, transformers" in text and "Speed not measured" in text


def test_a_broken_export_is_refused_before_the_baseline_is_read(
    checkpoints, tiny_model_dir, eval_text, tmp_path, monkeypatch, capsys
):
    broken = tmp_path / "broken"
    broken.mkdir()
    src = checkpoints["w8a8-ct"]
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "pack-quantized"  # lies about the tensors
    (broken / "config.json").write_text(json.dumps(config))

    def no_baseline(*a, **k):
        raise AssertionError("the baseline was read before the checkpoints were checked")

    monkeypatch.setattr(pipeline, "resolve", no_baseline)
    assert _eval([broken], tiny_model_dir, tmp_path / "r.json", eval_text) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantkit inspect" in err and "missing or wrong weight_packed" in err
    assert not (tmp_path / "r.json").exists()


def test_exports_state_vllm_kernel_shape_limits(checkpoints, capsys):
    """Tiny widths (64, 96) fit neither Marlin (in % 128) nor Machete (out % 128): inspect says so."""
    assert main(["inspect", str(checkpoints["w8a16-ct"])]) == 0
    out = capsys.readouterr().out
    assert "W8A16 on Marlin (in % 128, out % 64): 14 of 14 layers do not fit" in out
    assert main(["inspect", str(checkpoints["w8a8-ct"])]) == 0
    assert "W8A8 on CUTLASS (in, out % 16): all 14 layers fit" in capsys.readouterr().out


def test_export_warns_when_vllm_kernels_cannot_take_a_shape(tiny_model_dir, tmp_path, caplog):
    args = ["quantize", str(tiny_model_dir), "--scheme", "w8a16", "--format", "compressed-tensors"]
    with caplog.at_level("WARNING", logger="quantkit"):
        assert main([*args, "--out", str(tmp_path / "ct")]) == 0
    warned = [r.getMessage() for r in caplog.records if "Marlin" in r.getMessage()]
    assert warned and warned[0].startswith("14 of 14 layers do not fit vLLM's Marlin kernel")


def test_vllm_shape_rules():
    from quantkit.formats.compressed_tensors import vllm_shape_violations

    shapes = {"a": (4096, 4096), "b": (576, 576), "c": (1536, 576), "d": (576, 1536)}
    bad = vllm_shape_violations(shapes, {"e": (4096, 4096), "f": (100, 64)})
    assert bad["Marlin"] == ["b [576, 576]", "c [1536, 576]"]  # in % 128
    assert bad["Machete"] == ["b [576, 576]", "d [576, 1536]"]  # out % 128
    assert bad["CUTLASS scaled_mm (W8A8)"] == ["f [100, 64]"]
    assert vllm_shape_violations({"a": (4096, 14336)}, {}) == {}
