"""``--device``: auto and cpu run on the CPU here; CUDA where PyTorch sees none is one line, exit 2."""

import json

import pytest
import torch

from quantkit.cli import main
from quantkit.devices import device_name, resolve_device
from quantkit.errors import QuantkitError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert device_name(torch.device("cpu")) == "CPU"
    for bad in ("gpu", "cuda:x", "tpu:0", ""):
        if bad:
            with pytest.raises(QuantkitError, match="not one of"):
                resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
@pytest.mark.parametrize("command", ["quantize", "calibrate", "eval", "run"])
def test_cuda_without_a_gpu_is_one_line(command, tmp_path, tiny_model_dir, capsys):
    args = {
        "quantize": ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "o")],
        "calibrate": ["calibrate", str(tiny_model_dir), "--out", str(tmp_path / "s.safetensors")],
        "eval": ["eval", str(tmp_path), "--baseline", str(tiny_model_dir), "--out", str(tmp_path / "r.json")],
        "run": ["run", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")],
    }[command]
    assert main([*args, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantkit: error: --device cuda:1: PyTorch sees no CUDA GPU") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_quantize_and_eval_on_a_device(device, tmp_path, tiny_model_dir):
    ck = tmp_path / "ck"
    common = ["--samples", "2", "--seq-len", "32", "-q", "--device", device]
    assert main(["quantize", str(tiny_model_dir), "--out", str(ck), *common]) == 0
    text = tmp_path / "t.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 60)
    out = tmp_path / "r.json"
    args = ["eval", str(ck), "--baseline", str(tiny_model_dir), "--out", str(out), "--text", str(text)]
    assert main([*args, "--windows", "1", "--window", "32", "--no-speed", "-q", "--device", device]) == 0
    assert json.loads(out.read_text())["protocol"]["device"] == device_name(resolve_device(device))
