"""The prepared GPU check (eval/gpu_check.sh): the script parses, and its CPU-runnable pieces work here
(the tiny offline model and ``quantkit run`` on it); its GPU steps run only on a lent GPU."""

import json
import subprocess
import sys
from pathlib import Path

from quantkit.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses_and_names_every_step():
    script = ROOT / "eval" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for step in (
        "-m gpu tests",
        "eval/bench_kernels.py --m 1,16,64,256,2048",
        "eval/bench_model_gpu.py",
        "--device cuda",
    ):
        assert step in text


def test_tiny_offline_model_runs_the_whole_job(tmp_path):
    folder = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "eval" / "tiny_model.py"), "--out", str(folder)], check=True, cwd=ROOT)
    out = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--out", str(out), "--windows", "1", "--no-speed", "-q"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]][-4:] == [
        "w8a16",
        "w8a8-naive",
        "w8a8-smoothquant-a0.5",
        "w8a8-smoothquant",
    ]
    assert results["protocol"]["device"] in ("CPU",) or "NVIDIA" in results["protocol"]["device"]
