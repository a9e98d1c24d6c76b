"""quantkit's own safetensors reader and shard writer: equal to the safetensors package bit for bit,
every damaged file a one-line QuantkitError, shards cut at the limit with Hugging Face's index."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit import QuantkitError
from quantkit.formats.safetensors_io import CheckpointReader, read_header
from quantkit.formats.shard_writer import ShardWriter, parse_size


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, generator=g)
    return {
        "int8": torch.randint(-128, 128, (3, 5), dtype=torch.int8, generator=g),
        "fp32": f,
        "bf16": (f * 3).to(torch.bfloat16),
        "fp16": (f / 3).to(torch.float16),
        "int32": torch.randint(-(2**31), 2**31 - 1, (9,), dtype=torch.int32, generator=g),
        "int64": torch.tensor([-(2**62), 2**62, 0, 1, -1], dtype=torch.int64),
        "uint8": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "bool": torch.tensor([True, False, True]),
        "fp64": torch.randn(2, 2, 2, dtype=torch.float64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.float32),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file(_tensors(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_reader_equals_safetensors_bit_for_bit_and_aligns(checkpoint):
    expected = load_file(str(checkpoint / "model.safetensors"))
    with CheckpointReader(checkpoint) as r:
        got = {k: r.get(k) for k in r.keys()}
        assert dict(r.items()).keys() == got.keys()
        assert r.info("int8").dtype_name == "I8" and r.info("bf16").shape == (5, 7)
    _assert_bit_equal(got, expected)
    _assert_bit_equal(got, _tensors())
    # torch's AVX-512 int8 kernels need 64-byte aligned weights: every tensor is its own allocation.
    assert all(t.data_ptr() % 64 == 0 for t in got.values() if t.numel())
    header = read_header(checkpoint / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {k: (v.dtype, v.shape) for k, v in expected.items()}


def test_reader_closes_its_files(checkpoint):
    r = CheckpointReader(checkpoint)
    r.get("int8")
    handles = list(r._handles.values())
    r.close()
    assert handles and all(f.closed for f in handles)


def _assert_damaged(path, folder=None):
    with pytest.raises(QuantkitError) as e:
        read_header(path)
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "\n" not in msg, msg
    if folder is not None:
        with pytest.raises(QuantkitError, match="damaged"):
            CheckpointReader(folder)


def test_truncated_files_are_damaged(checkpoint):
    f = checkpoint / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (0, 3, 7, 8, 20, 8 + n - 1, 8 + n, 8 + n + 10, len(data) // 2, len(data) - 1):
        f.write_bytes(data[:cut])
        _assert_damaged(f, checkpoint)


def _write(path, header: dict, data: bytes, *, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header,data,length",
    [
        ({"a": _entry(offsets=(0, 16))}, bytes(8), None),  # past the data section
        ({"a": _entry(), "b": _entry(offsets=(4, 12))}, bytes(12), None),  # overlap
        ({"a": _entry(), "b": _entry(offsets=(12, 20))}, bytes(20), None),  # gap
        ({"a": _entry(offsets=(8, 0))}, bytes(8), None),  # reversed offsets
        ({"a": _entry(shape=(3,))}, bytes(8), None),  # 3 x F32 is 12 bytes, not 8
        ({"a": _entry(dtype="Q7")}, bytes(8), None),  # unknown dtype
        ({"a": _entry(shape=(-2,))}, bytes(8), None),
        ({"a": _entry(offsets=(0,))}, bytes(8), None),
        ({"a": [1, 2]}, bytes(8), None),
        ({"a": _entry()}, bytes(12), None),  # bytes after the last tensor
        ({"a": _entry()}, bytes(8), 10**12),  # header length past the end
    ],
    ids=["outside", "overlap", "gap", "reversed", "size", "dtype", "shape", "offsets", "entry", "trailing", "length"],
)
def test_bad_headers_are_damaged(tmp_path, header, data, length):
    f = tmp_path / "model.safetensors"
    _write(f, header, data, length=length)
    _assert_damaged(f, tmp_path)


def test_corrupt_header_json_is_damaged(checkpoint):
    f = checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    for pos, byte in ((8, b"x"), (20, b"\xff"), (9, b"}")):
        broken = bytearray(data)
        broken[pos : pos + 1] = byte
        f.write_bytes(bytes(broken))
        _assert_damaged(f, checkpoint)
    f.write_bytes(struct.pack("<Q", 2) + b"[]")  # JSON, but not an object
    _assert_damaged(f, checkpoint)


def test_header_in_any_order_and_metadata_are_fine(tmp_path):
    f = tmp_path / "model.safetensors"
    header = {"__metadata__": {"format": "pt"}, "b": _entry(offsets=(8, 16)), "a": _entry()}
    _write(f, header, struct.pack("<4f", 1, 2, 3, 4))
    with CheckpointReader(tmp_path) as r:
        assert sorted(r.keys()) == ["a", "b"]
        assert r.get("b").tolist() == [3.0, 4.0]


def test_missing_checkpoint_and_unknown_tensor(tmp_path, checkpoint):
    with pytest.raises(QuantkitError, match=r"no model\.safetensors"):
        CheckpointReader(tmp_path)
    with CheckpointReader(checkpoint) as r, pytest.raises(QuantkitError, match="no tensor nope"):
        r.get("nope")


# ---- the writer ------------------------------------------------------------------------------


def _sized(n: int, fill: int) -> torch.Tensor:
    return torch.full((n,), fill, dtype=torch.int8)


def test_writer_cuts_shards_at_the_limit_and_indexes_them(tmp_path):
    tensors = {
        "a": _sized(400, 1),
        "b": _sized(400, 2),
        "c": _sized(400, 3),
        "big": _sized(1500, 4),
        "e": _sized(100, 5),
    }
    with ShardWriter(tmp_path, 1000) as w:
        w.add({k: tensors[k] for k in ("a", "b")})
        w.add(list((k, tensors[k]) for k in ("c", "big", "e")))
    names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 2800}
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "big": names[2], "e": names[3]}
    for name in names:  # every shard within the limit, unless it holds one bigger tensor alone
        shard = load_file(str(tmp_path / name))
        assert sum(t.numel() for t in shard.values()) <= 1000 or len(shard) == 1
    with CheckpointReader(tmp_path) as r:
        _assert_bit_equal({k: r.get(k) for k in r.keys()}, tensors)


def test_writer_single_shard_is_exactly_save_file(tmp_path):
    tensors = _tensors()
    (tmp_path / "a").mkdir()
    with ShardWriter(tmp_path / "a", "5GB") as w:
        w.add(tensors)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors"]
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_writer_refuses_duplicates_and_cleans_up_on_error(tmp_path):
    with pytest.raises(QuantkitError, match="twice"), ShardWriter(tmp_path, 10) as w:
        w.add({"a": _sized(20, 1)})
        w.add({"b": _sized(4, 1)})
        w.add({"a": _sized(4, 1)})
    assert list(tmp_path.iterdir()) == []


def test_index_must_match_its_shards(tmp_path):
    with ShardWriter(tmp_path, 20) as w:  # a and b in the first shard, c in the second
        w.add({"a": _sized(10, 1), "b": _sized(10, 2), "c": _sized(10, 3)})
    index_file = tmp_path / "model.safetensors.index.json"
    good = json.loads(index_file.read_text())

    def check(index, match):
        index_file.write_text(json.dumps(index) if isinstance(index, dict) else index)
        with pytest.raises(QuantkitError, match=match) as e:
            CheckpointReader(tmp_path)
        assert "damaged" in str(e.value) and "\n" not in str(e.value)

    wm = good["weight_map"]
    check({"weight_map": {**wm, "a": "model-00009-of-00002.safetensors"}}, "not a file")
    check({"weight_map": {**wm, "a": "../model-00001-of-00002.safetensors"}}, "not a file")
    check({"weight_map": {**wm, "z": wm["a"]}}, "lacks tensors")
    check({"weight_map": {k: v for k, v in wm.items() if k != "b"}}, "does not list")
    check({"metadata": {}}, "weight_map")
    check("{not json", "not valid JSON")
    index_file.write_text(json.dumps(good))
    (tmp_path / wm["c"]).write_bytes((tmp_path / wm["c"]).read_bytes()[:-3])  # a truncated shard
    with pytest.raises(QuantkitError, match=wm["c"].replace(".", r"\.")):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1000000", 10**6),
        (4096, 4096),
        ("1.5gb", 1_500_000_000),
        (" 10 KiB ", 10240),
        ("7B", 7),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "5 GBs", "five", "-1GB", "0", "1e9", None, 2.5, True])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(QuantkitError, match="size"):
        parse_size(text)
