"""Safetensors checkpoints read and written in bounded memory: one tensor or one shard at a time.

Reading (:class:`CheckpointReader`) parses the format itself: an 8-byte little-endian header
length, a JSON header (``{name: {"dtype", "shape", "data_offsets"}}``, plus ``__metadata__``), then
the tensors' bytes. Every header is validated before any tensor is read, so a damaged file is one
clear :class:`~quantkit.errors.QuantkitError`, not a crash or a wrong tensor. Nothing is
memory-mapped: :meth:`CheckpointReader.get` reads one tensor with ``seek``/``readinto`` into
fresh memory from torch's allocator, which is 64-byte aligned (torch's AVX-512 int8 kernels crash on
misaligned weights; a mapped file puts tensors wherever they sit in it). Reading a tensor costs that
tensor's bytes and nothing more.

Writing is :mod:`quantkit.formats.shard_writer`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QuantkitError

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# safetensors' own limit on the JSON header; anything bigger is garbage, not a header.
MAX_HEADER_BYTES = 100_000_000
# CheckpointReader.fingerprint: how many bytes of each tensor it hashes.
FINGERPRINT_BYTES = 4096

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    **{
        name: getattr(torch, attr)
        for name, attr in (
            ("U16", "uint16"),
            ("U32", "uint32"),
            ("U64", "uint64"),
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E5M2", "float8_e5m2"),
        )
        if hasattr(torch, attr)
    },
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: dtype, shape and the byte range ``[start, end)``.

    ``start`` and ``end`` are absolute positions in the file (the header's ``data_offsets`` plus
    the header's own size), so reading the tensor is ``seek(start)`` and ``end - start`` bytes.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_name(self) -> str:
        """The safetensors name of the dtype (``I8``, ``BF16``, ...)."""
        return DTYPE_NAMES[self.dtype]


def _damaged(path: Path | str, what: str) -> QuantkitError:
    return QuantkitError(f"{path}: {what}; the checkpoint is damaged (write or download it again)")


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in the safetensors file ``path`` (reads the header only).

    Raises :class:`QuantkitError` if the file is truncated, its header is not valid JSON, or a
    tensor's dtype, shape or byte range is impossible (unknown dtype, size not dtype x shape, bytes
    outside the data section, overlapping or missing bytes), as safetensors itself validates.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _damaged(path, f"{size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _damaged(path, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise QuantkitError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    # The tensors' bytes must tile the data section exactly: sorted by position, each starts where
    # the previous one ended, and the last ends at the end of the file.
    pos = data_start
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else "leaves a gap before it"
            raise _damaged(path, f"tensor {name} at byte {t.start - data_start} {what}")
        pos = t.end
    if pos != size:
        raise _damaged(path, f"the tensors end at byte {pos}, the file at byte {size}")
    return tensors


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _damaged(path, f"header entry {name} is not an object")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise _damaged(path, f"tensor {name} has unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _damaged(path, f"tensor {name} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _damaged(path, f"tensor {name} has data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end or end > data_len:
        raise _damaged(path, f"tensor {name} has bytes [{begin}, {end}) outside the data section ({data_len} bytes)")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        what = f"{entry['dtype']}{shape} needs {expected} bytes, the header gives {end - begin}"
        raise _damaged(path, f"tensor {name} {what}")
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


class CheckpointReader:
    """The tensors of a model folder: one ``model.safetensors``, or Hugging Face shards and their index.

    Headers are read and validated on construction (the index too: every file it names must exist
    and hold the tensors it lists there, and no shard may hold a tensor the index does not list).
    :meth:`get` reads one tensor into fresh, aligned memory. Use as a context manager, or call
    :meth:`close`, to close the files.

    Example:
        >>> with CheckpointReader("smollm2-w8a8") as r:
        ...     w = r.get("model.layers.0.mlp.down_proj.weight")
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        single, index = self.folder / SINGLE_NAME, self.folder / INDEX_NAME
        if single.is_file():  # as transformers: a single file wins over an index
            self._infos = {name: (single, t) for name, t in read_header(single).items()}
        elif index.is_file():
            self._infos = _read_index(index)
        elif any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")) or any(self.folder.glob("*.pth")):
            raise QuantkitError(
                f"{self.folder} holds PyTorch pickle weights (.bin/.pt) only; quantkit reads safetensors and never "
                "unpickles (loading a pickle can run code): convert the folder to safetensors first"
            )
        else:
            raise QuantkitError(f"{self.folder} has no {SINGLE_NAME} or {INDEX_NAME}; the checkpoint is incomplete")

    @property
    def files(self) -> list[Path]:
        """The safetensors files, in shard order."""
        return sorted({p for p, _ in self._infos.values()})

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name)[1]

    def file_of(self, name: str) -> Path:
        return self._entry(name)[0]

    def _entry(self, name: str) -> tuple[Path, TensorInfo]:
        try:
            return self._infos[name]
        except KeyError:
            raise QuantkitError(f"{self.folder} has no tensor {name}") from None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from disk into new 64-byte aligned memory (no file is mapped)."""
        path, t = self._entry(name)
        return self._read(path, t, name)

    def _read(self, path: Path, t: TensorInfo, name: str) -> torch.Tensor:
        buf = torch.empty(t.nbytes, dtype=torch.uint8, device="cpu")  # even under a meta device context
        if t.nbytes:
            f = self._handles.get(path)
            if f is None:
                f = self._handles[path] = open(path, "rb", buffering=0)  # closed in close()
            f.seek(t.start)
            view, done = memoryview(buf.numpy()), 0
            while done < t.nbytes:  # one read() returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise _damaged(path, f"the file ends inside tensor {name}")
                done += got
        return buf.view(t.dtype).reshape(t.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``, read from disk alone."""
        path, t = self._entry(name)
        if not t.shape or not 0 <= start <= stop <= t.shape[0]:
            raise QuantkitError(f"rows {start}:{stop} are outside {name} {list(t.shape)}")
        row = t.nbytes // t.shape[0] if t.shape[0] else 0
        part = TensorInfo(t.dtype, (stop - start, *t.shape[1:]), t.start + start * row, t.start + stop * row)
        return self._read(path, part, name)

    def fingerprint(self) -> str:
        """A short hash that tells this model's weights from another's: every tensor's name, dtype, shape
        and first :data:`FINGERPRINT_BYTES` bytes. Independent of how the tensors are split into shards;
        reads a few MB even for a 70B model."""
        h = hashlib.sha256()
        for name in sorted(self._infos):
            path, t = self._entry(name)
            h.update(f"{name}:{t.dtype_name}:{list(t.shape)};".encode())
            n = min(t.nbytes, FINGERPRINT_BYTES)
            h.update(self._read(path, TensorInfo(torch.uint8, (n,), t.start, t.start + n), name).numpy().tobytes())
        return h.hexdigest()[:16]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order, one tensor read at a time."""
        for name in sorted(self._infos, key=lambda k: (self._infos[k][0], self._infos[k][1].start)):
            yield name, self.get(name)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_index(index: Path) -> dict[str, tuple[Path, TensorInfo]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(index, "not valid JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _damaged(index, "no weight_map of tensor names to file names")
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    for file in sorted(by_file):
        if Path(file).name != file or not (index.parent / file).is_file():
            raise _damaged(index, f"it lists {file}, which is not a file in {index.parent}")
    out = {}
    for file, names in sorted(by_file.items()):
        path = index.parent / file
        header = read_header(path)
        missing, extra = sorted(names - header.keys()), sorted(header.keys() - names)
        if missing:
            raise _damaged(index, f"{file} lacks tensors it lists there: {missing[:3]}")
        if extra:
            raise _damaged(index, f"{file} holds tensors it does not list there: {extra[:3]}")
        out.update({name: (path, header[name]) for name in names})
    return {name: out[name] for name in weight_map}
