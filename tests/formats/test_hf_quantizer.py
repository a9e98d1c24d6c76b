"""transformers integration: after ``import quantkit``, ``AutoModelForCausalLM.from_pretrained`` loads
quantkit checkpoints into quantkit's INT8 modules, bit-exact with :func:`quantkit.load`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig
from quantkit.core.calibration import collect_stats
from quantkit.core.modules import W8A8Linear, W8A16Linear
from quantkit.formats.hf_quantizer import QuantkitHfConfig, QuantkitHfQuantizer, register, supported

pytestmark = pytest.mark.skipif(not supported(), reason="transformers >= 5 needed for the quantizer registry")

CONFIGS = {
    "w8a8-sq": QuantConfig(scheme="w8a8"),  # norm folding + run-time pre-scales (smooth_inv)
    "w8a8-static": QuantConfig(scheme="w8a8", activations="per_tensor"),
    "w8a16": QuantConfig(scheme="w8a16"),
}


def _checkpoint(arch, name, path):
    model = make_tiny(arch).to(torch.bfloat16)
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    stats = collect_stats(model, samples, quantkit.select_targets(model, QuantConfig()), progress=False)
    quantkit.quantize(model, CONFIGS[name], stats, progress=False)
    quantkit.save(model, path)
    return path


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_pretrained_equals_quantkit_load(tmp_path, tiny_arch, name):
    path = _checkpoint(tiny_arch, name, tmp_path / "ck")
    ours = quantkit.load(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)
    cls = W8A16Linear if name == "w8a16" else W8A8Linear
    names = list(quantkit.read_record(path).modules)
    assert names and all(type(theirs.get_submodule(n)) is cls for n in names)
    assert theirs.dtype == torch.bfloat16  # the checkpoint's dtype, recorded by quantkit.save
    assert isinstance(theirs.config.quantization_config, QuantkitHfConfig)
    _assert_same(ours, theirs)
    # torch's AVX-512 int8 kernels crash on misaligned weights: loading must give aligned memory.
    assert all(b.data_ptr() % 64 == 0 for b in theirs.buffers() if b.dtype == torch.int8)


def test_dtype_argument_casts_float_tensors_but_not_scales(tmp_path):
    path = _checkpoint("llama", "w8a8-sq", tmp_path / "ck")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = quantkit.load(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in theirs.parameters())
    q = theirs.model.layers[0].self_attn.o_proj
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32 and q.smooth_inv is not None
    _assert_same(ours, theirs)


def test_save_pretrained_round_trips(tmp_path):
    path = _checkpoint("qwen2", "w8a8-static", tmp_path / "ck")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "resaved")
    _assert_same(quantkit.load(path), quantkit.load(tmp_path / "resaved"))
    quantkit.save(model, tmp_path / "quantkit-save")  # quantkit.save takes a from_pretrained model too
    _assert_same(quantkit.load(path), quantkit.load(tmp_path / "quantkit-save"))


def test_registration_is_idempotent_and_registered():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    # A second registration would raise in transformers' registry: register() must see the first.
    assert register() and register()
    assert AUTO_QUANTIZER_MAPPING["quantkit"] is QuantkitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["quantkit"] is QuantkitHfConfig


def test_unsupported_transformers_registers_nothing(monkeypatch):
    import quantkit.formats.hf_quantizer as hf

    monkeypatch.delattr(hf._auto, "register_quantizer")
    assert not hf.supported() and not hf.register()


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_is_cheap_and_registers_when_transformers_needs_it():
    """``import quantkit`` does not import transformers' quantizer registry (about a second), yet the
    registry knows quantkit as soon as it is imported; also when it was imported first."""
    out = _python(
        "import sys, quantkit; a = 'transformers.quantizers.auto' in sys.modules\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "print(a, 'quantkit' in M)"
    )
    assert out == "False True"
    out = _python(
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\nimport quantkit\nprint('quantkit' in M)"
    )
    assert out == "True"


@pytest.mark.slow
def test_default_model_from_pretrained_equals_quantkit_load(default_model_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    stats = quantkit.calibrate(model, tok, n_samples=4, seq_len=128, progress=False)
    quantkit.quantize(model.to(torch.bfloat16), QuantConfig(scheme="w8a8"), stats, progress=False)
    quantkit.save(model, tmp_path / "w8a8", tok)
    ours = quantkit.load(tmp_path / "w8a8")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8")
    assert isinstance(theirs.model.layers[0].mlp.down_proj, W8A8Linear)
    _assert_same(ours, theirs)
