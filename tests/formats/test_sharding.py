"""Sharded checkpoints: ``quantkit.save(max_shard_size=...)`` writes Hugging Face shards and an index,
and ``quantkit.load`` and ``from_pretrained`` (after ``import quantkit``) load them bit-exactly; a
checkpoint that fits in one shard is the same ``model.safetensors`` as ever."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, QuantkitError
from quantkit.core.calibration import collect_stats
from quantkit.formats.hf_quantizer import supported
from quantkit.formats.inspect import inspect
from quantkit.formats.native import unique_state_dict

SHARD = 12_000  # bytes: the tiny models' ~60 KB come out in 5+ shards

CASES = {
    "w8a8-llama": ("llama", QuantConfig(scheme="w8a8")),  # SmoothQuant: norm folds and run-time pre-scales
    "w8a16-gemma": ("gemma", QuantConfig(scheme="w8a16")),  # tied int8 embedding/lm_head table
}


def _quantized(case: str) -> torch.nn.Module:
    arch, config = CASES[case]
    model = make_tiny(arch).to(torch.bfloat16)
    torch.manual_seed(0)
    samples = torch.randint(0, 256, (4, 32))
    stats = collect_stats(model, samples, quantkit.select_targets(model, QuantConfig()), progress=False)
    return quantkit.quantize(model, config, stats, progress=False) or model


@pytest.fixture(scope="module", params=sorted(CASES))
def sharded(request, tmp_path_factory):
    """``(model in memory, sharded folder, single-file folder)``."""
    model = _quantized(request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    quantkit.save(model, tmp / "sharded", max_shard_size=SHARD)
    quantkit.save(model, tmp / "single")
    return model, tmp / "sharded", tmp / "single"


def _assert_same(a, b, *, logits=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    if logits:
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def _shards(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_sharded_save_writes_hf_shards_and_index(sharded):
    model, folder, _ = sharded
    shards = _shards(folder)
    assert len(shards) >= 3 and "model.safetensors" not in shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = unique_state_dict(model)
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_sharded_load_is_bit_exact(sharded):
    model, folder, single = sharded
    loaded = quantkit.load(folder)
    # Every tensor as quantized. (Logits are compared between loads: a model built in fp32 and cast
    # keeps bf16 rotary buffers that a model built in bf16 does not, so Gemma's differ in memory.)
    _assert_same(model, loaded, logits=False)
    _assert_same(quantkit.load(single), loaded)
    assert all(b.data_ptr() % 64 == 0 for b in loaded.buffers() if b.dtype == torch.int8)
    # dtype= casts float tensors but keeps the fp32 scales, as for one file
    _assert_same(quantkit.load(single, dtype=torch.float32), quantkit.load(folder, dtype=torch.float32))


def test_single_shard_is_the_same_file_as_before(sharded, tmp_path):
    model, _, single = sharded
    assert _shards(single) == ["model.safetensors"] and not (single / "model.safetensors.index.json").exists()
    save_file(unique_state_dict(model), str(tmp_path / "before.safetensors"), metadata={"format": "pt"})
    assert (single / "model.safetensors").read_bytes() == (tmp_path / "before.safetensors").read_bytes()


def test_load_maps_no_file(sharded, monkeypatch):
    """quantkit.load reads with its own reader: safetensors' memory-mapping loader is never used."""
    _, folder, _ = sharded

    def refuse(*args, **kwargs):
        raise AssertionError("safetensors.safe_open used")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    quantkit.load(folder)


def test_inspect_reads_shards(sharded):
    _, folder, single = sharded
    a, b = inspect(folder), inspect(single)
    assert a.consistent and b.consistent, (a.problems, b.problems)
    assert a.quantized == b.quantized and a.skipped == b.skipped
    assert {k: v for k, v in a.bytes.items() if k != "files"} == {k: v for k, v in b.bytes.items() if k != "files"}


@pytest.mark.skipif(not supported(), reason="transformers >= 5 needed for the quantizer registry")
def test_from_pretrained_loads_shards_like_quantkit_load(sharded):
    _, folder, _ = sharded
    ours = quantkit.load(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert theirs.dtype == torch.bfloat16
    _assert_same(ours, theirs)


@pytest.mark.skipif(not supported(), reason="transformers >= 5 needed for the quantizer registry")
def test_from_pretrained_device_map_auto_generates(sharded):
    _, folder, _ = sharded
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="auto")
    ours = quantkit.load(folder)
    ids = torch.randint(0, 256, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = theirs.generate(ids, **kw)
        assert out.shape == (2, 12) and torch.equal(out, ours.generate(ids, **kw))


def test_damaged_sharded_checkpoints_are_refused(sharded, tmp_path):
    import shutil

    _, folder, _ = sharded
    shards = _shards(folder)
    broken = tmp_path / "missing"
    shutil.copytree(folder, broken)
    (broken / shards[1]).unlink()
    with pytest.raises(QuantkitError, match=f"lists {shards[1]}.*damaged"):
        quantkit.load(broken)
    broken = tmp_path / "truncated"
    shutil.copytree(folder, broken)
    (broken / shards[-1]).write_bytes((broken / shards[-1]).read_bytes()[:-1])
    with pytest.raises(QuantkitError, match=f"{shards[-1]}.*damaged"):
        quantkit.load(broken)
    broken = tmp_path / "no-weights"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors.index.json").unlink()
    with pytest.raises(QuantkitError, match="incomplete"):
        quantkit.load(broken)


def test_bad_shard_size_is_refused_before_writing(tmp_path):
    model = _quantized("w8a8-llama")
    with pytest.raises(QuantkitError, match="size"):
        quantkit.save(model, tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists()


def test_interrupted_sharded_save_leaves_nothing(tmp_path, monkeypatch):
    from quantkit.formats.shard_writer import ShardWriter

    model = _quantized("w8a8-llama")
    real, written = ShardWriter._write_shard, []

    def third_shard_interrupted(self):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(len(self._parts))
        real(self)

    monkeypatch.setattr(ShardWriter, "_write_shard", third_shard_interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantkit.save(model, tmp_path / "out", max_shard_size=SHARD)
    assert len(written) == 2 and list(tmp_path.iterdir()) == []
