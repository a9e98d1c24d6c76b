"""A normal (non-editable) install works: the built wheel holds every file quantkit reads at run time,
and the default quantization and evaluation run from a directory that is not the repository."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__", "results", "texts")


def test_installed_wheel_quantizes_and_evaluates_from_another_directory(tmp_path, tiny_model_dir):
    source = tmp_path / "src"  # built from a copy: the build leaves no files in the repository
    shutil.copytree(ROOT, source, ignore=_SKIP)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], check=True)
    wheel = next(dist.glob("quantkit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = ["quantkit/data/persuasion.txt", "quantkit/data/emma.txt", "quantkit/kernels/cpu_fused.cpp"]
    shipped += [
        "quantkit/evaluation/lm_eval_tasks/quantkit_emma.yaml",
        "quantkit/evaluation/lm_eval_tasks/quantkit_emma.py",
    ]
    for packaged in shipped:
        assert packaged in names, packaged

    venv = tmp_path / "venv"  # torch and the other dependencies come from this interpreter's site-packages
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, quantkit = venv / "bin" / "python", venv / "bin" / "quantkit"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import quantkit; print(quantkit.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the repository's

    def run(*args: str) -> None:
        subprocess.run([str(quantkit), *args, "-q"], cwd=work, env=env, check=True)

    # W8A8 SmoothQuant calibrates on the shipped text; eval scores the shipped Emma
    run("quantize", str(tiny_model_dir), "--out", "ck", "--alpha", "0.5", "--samples", "2", "--seq-len", "32")
    run(
        "eval",
        "ck",
        "--baseline",
        str(tiny_model_dir),
        "--out",
        "r.json",
        "--windows",
        "1",
        "--window",
        "32",
        "--no-speed",
    )
    results = json.loads((work / "r.json").read_text())
    assert results["protocol"]["text"] == "emma.txt"
    assert all(r["perplexity"] > 0 for r in results["rows"])
