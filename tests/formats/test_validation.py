"""Tampered checkpoints: ``quantkit.load``, ``from_pretrained`` and ``quantkit inspect`` refuse every one
with a :class:`QuantkitError` naming the tensor (inspect: exit 1, the problem listed); none loads and
serves garbage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig
from quantkit.cli import main
from quantkit.core.calibration import collect_stats
from quantkit.errors import QuantkitError
from quantkit.formats.hf_quantizer import supported
from quantkit.formats.native import checkpoint_problems

L0 = "model.layers.0.self_attn.q_proj"
O0 = "model.layers.0.self_attn.o_proj"  # no norm before it: a run-time smoothing factor (smooth_inv)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid W8A8 SmoothQuant checkpoint (per-token) and a static one, of a tiny Llama."""
    folders = {}
    for name, config in {
        "dynamic": QuantConfig(scheme="w8a8"),
        "static": QuantConfig(scheme="w8a8", activations="per_tensor"),
    }.items():
        model = make_tiny("llama").to(torch.bfloat16)
        torch.manual_seed(0)
        stats = collect_stats(
            model, torch.randint(0, 256, (2, 16)), quantkit.select_targets(model, config), progress=False
        )
        quantkit.quantize(model, config, stats, progress=False)
        folders[name] = quantkit.save(model, tmp_path_factory.mktemp("good") / name)
    return folders


def _tensors(edit):
    def apply(folder):
        f = folder / "model.safetensors"
        t = load_file(f)
        edit(t)
        save_file(t, f, metadata={"format": "pt"})

    return apply


def _config(edit):
    def apply(folder):
        f = folder / "config.json"
        cfg = json.loads(f.read_text())
        edit(cfg)
        f.write_text(json.dumps(cfg))

    return apply


def _set(name, value):
    def edit(t):
        t[name] = value(t[name])

    return edit


def _truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


CASES = {
    "missing weight_scale": (_tensors(lambda t: t.pop(f"{L0}.weight_scale")), f"{L0}.weight_scale"),
    "missing int8 weight": (_tensors(lambda t: t.pop(f"{L0}.weight")), f"{L0}.weight"),
    "missing norm weight": (_tensors(lambda t: t.pop("model.norm.weight")), "model.norm.weight"),
    "extra tensor": (_tensors(lambda t: t.update({"model.extra.weight": torch.ones(3)})), "model.extra.weight"),
    "scale stored as int32": (_tensors(_set(f"{L0}.weight_scale", lambda x: x.int())), f"{L0}.weight_scale"),
    "uint8 weight": (_tensors(_set(f"{L0}.weight", lambda x: x.view(torch.uint8))), f"{L0}.weight"),
    "NaN scale": (_tensors(_set(f"{L0}.weight_scale", lambda x: x * float("nan"))), "NaN"),
    "negative scale": (_tensors(_set(f"{L0}.weight_scale", lambda x: -x)), "negative"),
    "missing smoothing factor": (_tensors(lambda t: t.pop(f"{O0}.smooth_inv")), f"{O0}.smooth_inv"),
    "float8 norm weight": (
        _tensors(_set("model.norm.weight", lambda x: x.to(torch.float8_e4m3fn))),
        "model.norm.weight",
    ),
    "Inf smoothing factor": (_tensors(_set(f"{O0}.smooth_inv", lambda x: x * float("inf"))), f"{O0}.smooth_inv"),
    "NaN norm weight": (_tensors(_set("model.norm.weight", lambda x: x * float("nan"))), "model.norm.weight"),
    "wrong shape": (_tensors(_set(f"{L0}.weight_scale", lambda x: x[:-1].clone())), f"{L0}.weight_scale"),
    "scheme says static, no input_scale": (
        _config(lambda c: c["quantization_config"].update(activations="per_tensor")),
        "input_scale",
    ),
    "scheme says w8a16, activation tensors": (
        _config(lambda c: c["quantization_config"].update(scheme="w8a16")),
        "W8A16",
    ),
    "format_version as a string": (_config(lambda c: c["quantization_config"].update(format_version="2")), "'2'"),
    "modules not a list": (_config(lambda c: c["quantization_config"].update(modules=7)), "modules"),
    "dtype not a float": (_config(lambda c: c.update(dtype="int8")), "int8"),
    "truncated file": (_truncate, "damaged"),
    "auto_map": (_config(lambda c: c.update(auto_map={"AutoModelForCausalLM": "x.Y"})), "auto_map"),
}


@pytest.fixture(params=sorted(CASES))
def tampered(request, good, tmp_path):
    damage, words = CASES[request.param]
    folder = shutil.copytree(good["dynamic"], tmp_path / "ck")
    damage(folder)
    return folder, words


def test_quantkit_load_refuses(tampered):
    folder, words = tampered
    with pytest.raises(QuantkitError, match=None) as e:
        quantkit.load(folder)
    assert words in str(e.value)


@pytest.mark.skipif(not supported(), reason="transformers >= 5 needed for the quantizer registry")
def test_from_pretrained_refuses(tampered):
    folder, words = tampered
    # transformers itself refuses a non-float dtype, with a clear ValueError, before quantkit is asked.
    with pytest.raises((QuantkitError, ValueError) if words == "int8" else QuantkitError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert words in str(e.value)


def test_inspect_reports_it(tampered, capsys):
    folder, words = tampered
    rc = main(["inspect", str(folder)])
    out = capsys.readouterr()
    assert rc in (1, 2)  # 1: inconsistent (listed); 2: cannot be read at all (one-line error)
    # inspect names a quantized layer's problem by the layer ("...q_proj: weight_scale is not fp32").
    words = words.rpartition(".")[0] if words.startswith((L0 + ".", O0 + ".")) else words
    assert words in (out.out if rc == 1 else out.err)
    if rc == 2:
        assert len(out.err.strip().splitlines()) == 1


def test_valid_checkpoints_pass(good):
    for folder in good.values():
        assert checkpoint_problems(folder) == []
        quantkit.load(folder)


def test_static_checkpoint_without_input_scale_is_refused(good, tmp_path):
    folder = shutil.copytree(good["static"], tmp_path / "ck")
    _tensors(lambda t: t.pop(f"{L0}.input_scale"))(folder)
    with pytest.raises(QuantkitError, match="lacks an input_scale"):
        quantkit.load(folder)


def test_deleted_bias_is_refused(tmp_path):
    """Whether a layer has a bias is the architecture's to say (Qwen2's attention has one), not the files'."""
    model = make_tiny("qwen2").to(torch.bfloat16)
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    folder = quantkit.save(model, tmp_path / "ck")
    _tensors(lambda t: t.pop(f"{L0}.bias"))(folder)
    with pytest.raises(QuantkitError, match=f"{L0}.bias"):
        quantkit.load(folder)
