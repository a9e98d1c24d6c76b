"""Wrong input, as an adversarial user gives it: every case ends in one clear line, exit 2, and
nothing lost. Source models, statistics, outputs, eval and report inputs; checkpoints are in
tests/formats/test_validation.py, kills in tests/cli/test_faults.py."""

import json
import os
import shutil
import stat

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from quantkit.cli import main
from quantkit.core.calibration import save_stats
from quantkit.formats import output_dir
from quantkit.formats.native import checkpoint_problems, read_record


def _quantize(model_dir, out, *extra):
    return main(["quantize", str(model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q", *extra])


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantkit") and "error:" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny float model that a test may damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _edit_tensors(folder, edit):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(folder, edit, name="config.json"):
    f = folder / name
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))


# --- source models ---------------------------------------------------------------------------


def test_auto_map_model_is_refused_without_running_its_code(tmp_path, model_copy, capsys):
    marker = tmp_path / "code-ran"
    (model_copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    _edit_config(model_copy, lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}))
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "auto_map")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_auto_map_in_tokenizer_config_is_refused(tmp_path, model_copy, capsys):
    _edit_config(model_copy, lambda c: c.update(auto_map={"AutoTokenizer": ["tok.Tok", None]}), "tokenizer_config.json")
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "auto_map")


def test_missing_source_weight_is_refused_not_randomly_initialized(tmp_path, model_copy, capsys):
    _edit_tensors(model_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "model.layers.1.mlp.up_proj.weight", "lacks")
    assert not (tmp_path / "out").exists()
    # The float loader (calibrate, eval baselines) refuses it too.
    assert main(["calibrate", str(model_copy), "--out", str(tmp_path / "s.safetensors"), "-q"]) == 2
    _one_line_error(capsys, "lacks")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_source_weight_is_refused(tmp_path, model_copy, capsys, value):
    def poison(t):
        t["model.layers.1.self_attn.o_proj.weight"][3, 5] = value

    _edit_tensors(model_copy, poison)
    for scheme in ("w8a8", "w8a16"):
        assert _quantize(model_copy, tmp_path / "out", "--scheme", scheme) == 2
        _one_line_error(capsys, "model.layers.1.self_attn.o_proj.weight", "NaN or Inf")
        assert not (tmp_path / "out").exists()


def test_model_saved_as_another_head_is_refused(tmp_path, model_copy, capsys):
    _edit_config(model_copy, lambda c: c.update(architectures=["LlamaForSequenceClassification"]))
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "LlamaForSequenceClassification", "not as a causal language model")


def test_bert_without_lm_head_is_refused(tmp_path, capsys):
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    assert _quantize(tmp_path / "bert", tmp_path / "out") == 2
    _one_line_error(capsys, "BertModel")
    assert not (tmp_path / "out").exists()


def test_mamba_is_refused(tmp_path, capsys):
    config = transformers.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path / "mamba")
    assert _quantize(tmp_path / "mamba", tmp_path / "out") == 2
    _one_line_error(capsys, "mamba", "does not support")


# --- statistics --------------------------------------------------------------------------------


def test_statistics_from_another_model_are_refused(tmp_path, tiny_model_dir, capsys):
    # Same architecture and shapes, other weights: only the recorded fingerprint tells them apart.
    other = tmp_path / "other"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(7)
    for p in model.parameters():
        p.data.normal_()
    model.save_pretrained(other)
    shutil.copy(tiny_model_dir / "tokenizer.json", other)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", other)
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(other), "--out", str(stats), "--samples", "2", "--seq-len", "32", "-q"]) == 0
    assert _quantize(tiny_model_dir, tmp_path / "out", "--stats", str(stats)) == 2
    _one_line_error(capsys, "another model")
    assert _quantize(other, tmp_path / "out", "--stats", str(stats)) == 0  # its own model takes them


def test_non_finite_or_damaged_statistics_are_refused(tmp_path, tiny_model_dir, capsys):
    stats = tmp_path / "nan.safetensors"
    save_stats({"model.layers.0.self_attn.q_proj": torch.full((64,), float("nan"))}, stats)
    assert _quantize(tiny_model_dir, tmp_path / "out", "--stats", str(stats)) == 2
    _one_line_error(capsys, "NaN or Inf")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert _quantize(tiny_model_dir, tmp_path / "out", "--stats", str(broken)) == 2
    _one_line_error(capsys, "not a readable safetensors file")


# --- outputs -----------------------------------------------------------------------------------


def test_out_equal_to_inside_or_around_the_source_is_refused(tmp_path, model_copy, capsys):
    before = sorted(p.name for p in model_copy.iterdir())
    for out in (model_copy, model_copy / "int8", tmp_path):
        assert _quantize(model_copy, out, "--overwrite") == 2
        _one_line_error(capsys, "source model")
    assert sorted(p.name for p in model_copy.iterdir()) == before
    assert "quantization_config" not in json.loads((model_copy / "config.json").read_text())


def test_out_under_a_file_is_refused_before_loading(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "file").write_text("x")
    assert _quantize(tiny_model_dir, tmp_path / "file" / "out") == 2
    _one_line_error(capsys, "is a file")


def _full_disk_and_no_work(monkeypatch, tmp_path, module, name):
    """A disk with 1000 bytes free, and ``module.name`` (the slow work) failing the test if it runs."""

    def never(*a, **k):
        raise AssertionError("quantization started")

    monkeypatch.setattr(module, name, never)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda p: usage._replace(free=1000))


def test_full_disk_is_refused_before_the_slow_work(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import quantkit.core.sequential as sequential

    _full_disk_and_no_work(monkeypatch, tmp_path, sequential, "quantize_targets")
    assert _quantize(tiny_model_dir, tmp_path / "out") == 2
    _one_line_error(capsys, "free", "needs about")


def test_checkpoint_files_are_readable_by_others(tmp_path, tiny_model_dir):
    old = os.umask(0o022)
    try:
        assert _quantize(tiny_model_dir, tmp_path / "out") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_overwrite_swaps_in_one_step_and_leaves_nothing_behind(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 0
    assert _quantize(tiny_model_dir, out, "--overwrite") == 0
    assert read_record(out).config.scheme == "w8a8" and checkpoint_problems(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Where the atomic exchange is not available, the two-rename fallback gives the same result.
    monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    assert _quantize(tiny_model_dir, out, "--overwrite", "--scheme", "w8a16") == 0
    assert read_record(out).config.scheme == "w8a16" and checkpoint_problems(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_folders_of_dead_runs_are_cleaned_and_an_orphaned_old_output_restored(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert _quantize(tiny_model_dir, out, "--scheme", "w8a16") == 0
    dead = 2**22 + 12345  # above any pid_max: no such process
    out.rename(tmp_path / f".out.old-{dead}")  # killed between the two renames of the fallback
    (tmp_path / f".out.partial-{dead + 1}").mkdir()
    (tmp_path / f".out.partial-{dead + 1}" / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a running process's work is left alone
    alive.mkdir()
    assert _quantize(tiny_model_dir, out) == 2  # the old output is back, so it asks for --overwrite
    assert read_record(out).config.scheme == "w8a16" and checkpoint_problems(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name])


# --- eval and report -----------------------------------------------------------------------------


@pytest.fixture
def eval_text(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("Emma Woodhouse, handsome, clever, and rich. " * 60)
    return f


def _eval(ck, baseline, out, text, *extra):
    args = ["eval", str(ck), "--baseline", str(baseline), "--out", str(out), "--text", str(text)]
    return main([*args, "--windows", "1", "--window", "32", "--no-speed", "-q", *extra])


def test_eval_refuses_a_baseline_the_checkpoint_was_not_made_from(tmp_path, tiny_model_dir, eval_text, capsys):
    ck = tmp_path / "ck"
    assert _quantize(tiny_model_dir, ck, "--scheme", "w8a16") == 0
    other = tmp_path / "other"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, other)
    assert _eval(ck, other, tmp_path / "r.json", eval_text) == 2
    _one_line_error(capsys, "was not made from the baseline", "--force")
    assert not (tmp_path / "r.json").exists()
    assert _eval(ck, other, tmp_path / "r.json", eval_text, "--force") == 0
    assert _eval(ck, tiny_model_dir, tmp_path / "r2.json", eval_text) == 0


def test_non_finite_perplexity_is_an_error_not_a_number(tmp_path, tiny_model_dir, eval_text, monkeypatch, capsys):
    from quantkit.evaluation import measure

    ck = tmp_path / "ck"
    assert _quantize(tiny_model_dir, ck, "--scheme", "w8a16") == 0
    monkeypatch.setattr(measure, "perplexity", lambda *a, **k: float("nan"))
    assert _eval(ck, tiny_model_dir, tmp_path / "r.json", eval_text) == 2
    _one_line_error(capsys, "perplexity", "nan")
    assert not (tmp_path / "r.json").exists()


def test_auto_alpha_with_saved_statistics_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys):
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(tiny_model_dir), "--out", str(stats), "--samples", "2", "--seq-len", "32", "-q"]) == 0
    capsys.readouterr()
    assert _quantize(tiny_model_dir, tmp_path / "q", "--alpha", "auto", "--stats", str(stats)) == 2
    _one_line_error(capsys, "auto", "--stats")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["eval", "a", "--baseline", "b", "--out", "c", "--windows", "0"], ["--windows", "at least 1"]),
        (["eval", "a", "--baseline", "b", "--out", "c", "--window", "1"], ["--window", "at least 2"]),
        (["quantize", "m", "--out", "o", "--alpha", "1.5"], ["--alpha", "[0, 1]"]),
        (["quantize", "m", "--out", "o", "--alpha", "nan"], ["--alpha"]),
        (["quantize", "m", "--out", "o", "--alpha", "automatic"], ["--alpha", "not a number"]),
        (["quantize", "m", "--out", "o", "--samples", "-3"], ["--samples"]),
        (["quantize", "m", "--out", "o", "--seq-len", "x"], ["--seq-len", "whole number"]),
        (["quantize", "m"], ["--out"]),
    ],
)
def test_option_values_are_checked_before_any_work(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    _one_line_error(capsys, *words)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("protocol"), ["no protocol"]),
        (lambda d: d["rows"][0].update(perplexity=0), ["perplexity 0"]),
        (lambda d: d["rows"][0].update(perplexity="NaN"), ["perplexity"]),
        (lambda d: d.update(baseline="nope"), ["baseline"]),
        (lambda d: d.update(rows=[]), ["no rows"]),
    ],
)
def test_report_refuses_damaged_results(tmp_path, edit, words, capsys):
    data = {
        "schema": "quantkit.eval/1",
        "protocol": {"window": 32, "windows": 1},
        "baseline": "float (float32)",
        "rows": [{"name": "float (float32)", "kind": "float", "dtype": "float32", "perplexity": 12.5}],
    }
    edit(data)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(data))
    assert main(["report", str(f), "--out", str(tmp_path / "r.md")]) == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "r.md").exists()


def test_unexpected_errors_are_one_line_and_the_traceback_is_behind_verbose(monkeypatch, capsys, tmp_path):
    from quantkit.cli import commands

    def boom(args, progress):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setitem(commands.COMMANDS, "inspect", boom)
    assert main(["inspect", str(tmp_path)]) == 1
    _one_line_error(capsys, "unexpected RuntimeError: something broke", "--verbose")
    with pytest.raises(RuntimeError):
        main(["inspect", str(tmp_path), "--verbose"])


def test_os_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from quantkit.cli import commands

    def full(args, progress):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setitem(commands.COMMANDS, "inspect", full)
    assert main(["inspect", str(tmp_path)]) == 2
    _one_line_error(capsys, "No space left on device")


def test_report_never_overwrites_its_inputs(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text("{}")
    for out in (["--out", str(f)], ["--out", str(tmp_path / "r.md"), "--html", str(f)]):
        assert main(["report", str(f), *out]) == 2
        _one_line_error(capsys, "overwrite")
    assert f.read_text() == "{}"


def test_eval_never_writes_into_a_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    assert main(["eval", str(ck), "--baseline", "b", "--out", str(ck / "config.json")]) == 2
    _one_line_error(capsys, "inside checkpoint")
    assert (ck / "config.json").read_text() == "{}"


def test_pickle_only_model_and_missing_tokenizer_are_refused(tmp_path, model_copy, capsys):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")  # a pickle is never opened
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "pickle", "safetensors")
    (model_copy / "pytorch_model.bin").rename(model_copy / "model.safetensors")
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer_config.json").unlink()
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "tokenizer")


def test_config_with_a_field_of_the_wrong_type_is_one_line(tmp_path, model_copy, capsys):
    _edit_config(model_copy, lambda c: c.update(hidden_size="abc"))
    assert _quantize(model_copy, tmp_path / "out") == 2
    _one_line_error(capsys, "config")


def test_eval_never_writes_into_the_baseline_or_over_its_text(tmp_path, model_copy, capsys):
    text = tmp_path / "t.txt"
    text.write_text("words " * 100)
    (tmp_path / "ck").mkdir()
    for out, words in ((model_copy / "model.safetensors", "baseline"), (text, "evaluation text")):
        before = out.read_bytes()
        args = ["eval", str(tmp_path / "ck"), "--baseline", str(model_copy), "--out", str(out), "--text", str(text)]
        assert main([*args, "--force"]) == 2
        _one_line_error(capsys, words)
        assert out.read_bytes() == before


def test_eval_refuses_a_damaged_checkpoint_before_measuring_the_baseline(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from quantkit.evaluation import pipeline

    ck = tmp_path / "ck"
    assert _quantize(tiny_model_dir, ck, "--scheme", "w8a16") == 0
    tensors = load_file(ck / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale"][0] = float("nan")
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})

    def never(*a, **k):
        raise AssertionError("the baseline was loaded")

    monkeypatch.setattr(pipeline, "load_float", never)
    assert main(["eval", str(ck), "--baseline", str(tiny_model_dir), "--out", str(tmp_path / "r.json"), "-q"]) == 2
    _one_line_error(capsys, "NaN")


def test_out_that_is_a_symlink_or_the_current_folder_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert _quantize(tiny_model_dir, tmp_path / "link", "--overwrite") == 2
    _one_line_error(capsys, "symbolic link")
    monkeypatch.chdir(real)
    for out in (".", str(real), str(tmp_path)):
        assert _quantize(tiny_model_dir, out, "--overwrite") == 2
        _one_line_error(capsys, "current folder")


def test_calibrate_creates_the_output_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "new" / "sub" / "stats.safetensors"
    assert main(["calibrate", str(tiny_model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32", "-q"]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["stats.safetensors"]


def test_run_checks_room_for_every_variant_before_the_first(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from quantkit.evaluation import default_job

    _full_disk_and_no_work(monkeypatch, tmp_path, default_job, "quantize_to_disk")
    assert main(["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"), "-q"]) == 2
    _one_line_error(capsys, "needs about")


def _run(tiny_model_dir, out, *extra):
    args = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--samples", "2", "--seq-len", "32"]
    return main([*args, "--windows", "1", "--no-speed", "-q", *extra])


def test_run_keeps_its_checkpoints_when_evaluation_fails(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from quantkit.evaluation import default_job

    def fail(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(default_job, "evaluate_all", fail)
    out = tmp_path / "run"
    assert _run(tiny_model_dir, out, "--scheme", "w8a16") == 2
    _one_line_error(capsys, "evaluating them failed", "the evaluation broke", "quantkit eval")
    assert not (out / "results.json").exists()
    assert checkpoint_problems(out / "w8a16") == [] and read_record(out / "w8a16").config.scheme == "w8a16"


def test_run_takes_the_options_of_the_verbs_it_chains(tmp_path, tiny_model_dir, eval_text, capsys):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, out, "--scheme", "w8a8", "--alpha", "0.5", "--text", str(eval_text)) == 0
    results = json.loads((out / "results.json").read_text())
    quantized = [r["name"] for r in results["rows"] if r.get("config")]
    assert quantized == ["w8a8-naive", "w8a8-smoothquant"]  # 0.5 is the comparison variant's alpha: one of them
    assert read_record(out / "w8a8-smoothquant").config.alpha == 0.5
    assert results["protocol"]["text"] == eval_text.name
    capsys.readouterr()
    assert _run(tiny_model_dir, tmp_path / "r2", "--text", str(tmp_path / "missing.txt")) == 2
    _one_line_error(capsys, "missing.txt", "not found")
    assert not (tmp_path / "r2").exists()
