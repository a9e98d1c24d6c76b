"""eval/train_tiny.py, the offline second model: it trains (the loss falls) and writes a folder that
quantkit quantizes with alpha auto."""

import json
import subprocess
import sys
from pathlib import Path

import quantkit
from quantkit import QuantConfig
from quantkit.evaluation.pipeline import quantize_to_disk

ROOT = Path(__file__).resolve().parents[2]


def test_train_tiny_trains_and_the_model_quantizes(tmp_path):
    folder = tmp_path / "opt"
    args = ["--out", str(folder), "--steps", "30", "--layers", "1", "--hidden", "64"]
    subprocess.run([sys.executable, str(ROOT / "eval" / "train_tiny.py"), *args], check=True, cwd=tmp_path)
    info = json.loads((folder / "training.json").read_text())
    assert info["text"] == "pride_and_prejudice.txt" and info["steps"] == 30
    assert info["final_train_loss"] < 8.0  # from ln(4096) = 8.3 at random init
    out = quantize_to_disk(folder, tmp_path / "q", QuantConfig(alpha="auto"), n_samples=4, seq_len=64, progress=False)
    record = quantkit.read_record(out)
    assert record.alpha_search["chosen"] in record.alpha_search["alphas"]
    assert quantkit.load(out).config.model_type == "opt"
