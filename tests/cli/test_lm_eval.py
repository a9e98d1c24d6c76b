"""``quantkit lm-eval``: lm-evaluation-harness on a quantkit checkpoint, offline, on a tiny model.

The command is what makes it work: plain ``lm_eval`` refuses the same checkpoint. The score it
reports equals lm-eval's score of the model ``quantkit.load`` gives, and is close to the float model's.
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import quantkit
from quantkit import QuantConfig
from quantkit.cli import main
from quantkit.evaluation import harness
from quantkit.formats.hf_quantizer import supported

ROOT = Path(__file__).resolve().parents[2]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval not installed: pip install 'quantkit[lm-eval]'")
needs_registry = pytest.mark.skipif(not supported(), reason="transformers >= 5 needed for from_pretrained")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """``(float folder, its W8A16 checkpoint)``: a tiny random Llama with the default model's tokenizer and
    a 256-token context, so lm-eval's rolling windows over a chapter stay small."""
    root = tmp_path_factory.mktemp("lm-eval")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    quantkit.save(model, root / "w8a16", tokenizer)
    return root / "float", root / "w8a16"


def _task_args(pretrained: Path, out: Path) -> list[str]:
    model = ["--model", "hf", "--model_args", f"pretrained={pretrained},dtype=float32"]
    return [*model, "--tasks", "quantkit_emma", "--limit", "1", "--output_path", str(out)]


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **OFFLINE, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _in_process_score(model, tokenizer) -> dict:
    """lm-eval's quantkit_emma result (first chapter) for a model object, as the reference."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(harness.TASKS_DIR))
    results = simple_evaluate(model=lm, tasks=[harness.EMMA_TASK], limit=1, task_manager=manager)
    return results["results"][harness.EMMA_TASK]


@needs_lm_eval
@needs_registry
def test_lm_eval_scores_a_quantkit_checkpoint_offline(tmp_path, models, monkeypatch):
    float_dir, ckpt = models
    proc = _subprocess(["-m", "quantkit.cli", "lm-eval", *_task_args(ckpt, tmp_path / "out")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    ours = json.loads(results_file.read_text())["results"][harness.EMMA_TASK]
    assert math.isfinite(ours["word_perplexity,none"]) and ours["word_perplexity,none"] > 1
    assert math.isfinite(ours["bits_per_byte,none"]) and ours["bits_per_byte,none"] > 0

    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    # The command loaded the checkpoint through from_pretrained: the same model as quantkit.load, so the same score.
    reference = _in_process_score(quantkit.load(ckpt, dtype=torch.float32), tokenizer)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours[metric] == pytest.approx(reference[metric], rel=1e-6), metric
    # ... and the quantized one: not the float model's score, but near it (a random model's predictions are
    # near uniform, so the drift is tiny here; the default model's is in the README).
    floats = _in_process_score(
        transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32), tokenizer
    )
    drift = ours["bits_per_byte,none"] / floats["bits_per_byte,none"] - 1
    assert 0 < abs(drift) < 0.01, drift


@needs_lm_eval
@needs_registry
def test_plain_lm_eval_refuses_the_checkpoint(tmp_path, models):
    """What the command fixes: lm_eval without quantkit imported does not know the quantization method."""
    _, ckpt = models
    args = ["-m", "lm_eval", *_task_args(ckpt, tmp_path / "out"), "--include_path", str(harness.TASKS_DIR)]
    proc = _subprocess(args, tmp_path)
    assert proc.returncode != 0
    assert "Unknown quantization type" in proc.stderr and "quantkit" in proc.stderr


def _error(capsys, *args: str) -> str:
    """The one-line error of ``quantkit lm-eval ARGS``, which must come before lm-eval is imported."""
    rc = main(["lm-eval", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("quantkit: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def no_lm_eval_run(monkeypatch):
    """Reaching lm-eval's command line fails the test: bad input must be refused before it starts."""
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    monkeypatch.setattr(harness, "_check_lm_eval", lambda: None)  # as if installed


def test_bad_model_folders_are_refused_first(tmp_path, capsys, no_lm_eval_run):
    missing = tmp_path / "nope"
    assert "not found" in _error(capsys, "--model", "hf", "--model_args", f"pretrained={missing}", "--tasks", "x")
    assert "no config.json" in _error(capsys, "--model_args", f"pretrained={tmp_path},dtype=float32", "--tasks", "x")
    err = _error(capsys, "-a", "pretrained=smollm2-135m", "-t", "quantkit_emma")
    assert "pretrained=" in err and "smollm2-135m-instruct" in err  # the folder to pass instead
    err = _error(capsys, "--model_args", json.dumps({"pretrained": str(missing)}), "--tasks", "x")
    assert "not found" in err
    err = _error(capsys, "--model_args", "pretrained=~/ckpt", "--tasks", "x")  # the shell leaves it
    assert f"pretrained={Path.home() / 'ckpt'}" in err


def test_bad_checkpoints_and_back_ends_are_refused_first(tmp_path, capsys, models, no_lm_eval_run):
    _, ckpt = models
    err = _error(capsys, "--model", "vllm", "--model_args", f"pretrained={ckpt}", "--tasks", "x")
    assert "compressed-tensors" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]  # the config promises a tensor that is not there
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    err = _error(capsys, "--model_args", f"pretrained={damaged}", "--tasks", "x")
    assert "not a valid quantkit checkpoint" in err and "down_proj.weight_scale is missing" in err


def test_shipped_task_with_another_include_path_names_the_file(tmp_path, capsys, no_lm_eval_run):
    err = _error(capsys, "--tasks", "quantkit_emma,hellaswag", "--include_path", str(tmp_path))
    assert str(harness.TASKS_DIR / "quantkit_emma.yaml") in err


def test_missing_or_old_lm_eval_says_what_to_install(capsys, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(harness.importlib.metadata, "version", not_installed)
    assert "pip install 'lm_eval>=0.4.10'" in _error(capsys, "--tasks", "quantkit_emma", "--limit", "1")
    monkeypatch.setattr(harness.importlib.metadata, "version", lambda name: "0.4.5")
    assert "too old" in _error(capsys, "--tasks", "quantkit_emma", "--limit", "1")


def test_arguments_pass_through_unchanged(monkeypatch):
    monkeypatch.setattr(harness, "_check_lm_eval", lambda: None)
    args = ["run", "--model", "hf", "--model_args", "pretrained=gpt2", "--tasks", "a", "b", "--limit", "-1"]
    include = ["--include_path", str(harness.TASKS_DIR)]
    assert harness.prepare_args(args) == args + include
    legacy = ["--model", "hf", "--tasks", "a", "--model_args=pretrained=gpt2", "-b", "4"]
    assert harness.prepare_args(legacy) == legacy + include
    assert harness.prepare_args(["ls", "tasks"]) == ["ls", "tasks", *include]
    for given in (["--include_path", "/x"], ["--config", "c.yaml"], ["run", "--help"], ["run"], []):
        assert harness.prepare_args(given) == given  # their own folder, their config's, help, lm-eval's usage


def test_parser_keeps_the_arguments_and_explains_itself(capsys):
    from quantkit.cli import build_parser

    args = ["--model", "hf", "-v", "DEBUG", "--device", "cpu", "-q", "x"]
    parsed = build_parser().parse_args(["lm-eval", *args])
    assert parsed.command == "lm-eval" and parsed.lm_eval_args == args
    with pytest.raises(SystemExit) as e:
        main(["lm-eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lm_eval" in out and "quantkit_emma" in out and "pip install" in out


@needs_lm_eval
def test_shipped_task_documents_are_the_chapters_of_emma():
    docs = harness.emma_chapters(version=1.0)["test"]["text"]
    assert len(docs) == 55  # 18 + 18 + 19 chapters in three volumes
    assert docs[0].startswith("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy")
    assert docs[-1].endswith("were fully answered in the perfect happiness of the union.")
    assert not any("CHAPTER" in d or "VOLUME" in d for d in docs)
    assert all("\n\n" in d and "\n\n\n" not in d for d in docs)  # paragraphs kept, line wrapping gone
    words = sum(len(d.split()) for d in docs)
    assert 150_000 < words < 160_000
