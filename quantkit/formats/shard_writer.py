"""Writing checkpoints as Hugging Face lays them out, streaming: :class:`ShardWriter`.

One ``model.safetensors`` when everything fits in one shard, else ``model-00001-of-0000N.safetensors``
... and ``model.safetensors.index.json``. Tensors stream to disk as they are added, so a writer holds
none: a checkpoint of any size is written in the memory of its largest tensor.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import QuantkitError
from .safetensors_io import DTYPE_NAMES

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000000"`` (GB = 10^9, GiB = 2^30,
    Hugging Face's convention)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if m is None:
            raise QuantkitError(f"cannot read {size!r} as a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise QuantkitError(f"a shard size must be positive, got {size!r}")
    return n


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# The order safetensors lays tensors out in (descending, then by name): every tensor then starts at a
# multiple of its element size. Reproduced so that a single shard is byte-identical to save_file's.
_LAYOUT_RANK = {
    name: i
    for i, name in enumerate(
        [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "F64",
            "I64",
            "U64",
        ]
    )
}
_COPY_CHUNK = 16 * 2**20


class ShardWriter:
    """Write tensors to ``folder`` as Hugging Face shards of at most ``max_shard_bytes`` each, streaming.

    :meth:`add` appends each tensor's bytes to a temporary data file at once, so the writer holds no
    tensor after ``add`` returns; when a shard is full (the next tensor would overflow it; a tensor
    bigger than the limit gets a shard of its own) its safetensors file is written from the data
    file: header, then the bytes in safetensors' own order. :meth:`close` names the shards
    ``model-0000N-of-0000M.safetensors`` and writes ``model.safetensors.index.json``, or, if
    everything fit in one shard, names it ``model.safetensors`` with no index: byte for byte what
    ``safetensors.torch.save_file`` writes for the same tensors. Names may not repeat. On an
    exception inside ``with``, everything written is removed.

    Example:
        >>> with ShardWriter(tmp, "5GB") as w:
        ...     w.add(layer_state)   # memory: one tensor at a time
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int | str, prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.prefix = prefix
        self._data = None  # the open temporary data file of the current shard
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []  # name, dtype, shape, pos, bytes
        self._shard_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self.files: list[Path] | None = None  # set by close()

    def add(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.files is not None:
            raise QuantkitError("this ShardWriter is closed")
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, t in items:
            if name in self._names:
                raise QuantkitError(f"tensor {name} written twice")
            if t.dtype not in DTYPE_NAMES:
                raise QuantkitError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
            self._names.add(name)
            n = tensor_bytes(t)
            if self._entries and self._shard_bytes + n > self.max_shard_bytes:
                self._write_shard()
            data = self._data_file()
            pos = data.tell()
            flat = t.detach().contiguous().cpu().reshape(-1)
            data.write(memoryview(flat.view(torch.uint8).numpy()) if n else b"")
            self._entries.append((name, DTYPE_NAMES[t.dtype], tuple(t.shape), pos, n))
            self._shard_bytes += n
            self.total_size += n
            if self._shard_bytes >= self.max_shard_bytes:
                self._write_shard()

    def _data_file(self):
        """The current shard's temporary data file (open across add() calls; closed by _close_data)."""
        if self._data is None:
            self._data = (self.folder / f".{self.prefix}-part-{len(self._parts) + 1:05d}.data").open("w+b")
        return self._data

    def _write_shard(self) -> None:
        """The current shard's safetensors file, from its data file; then a fresh shard."""
        order = sorted(self._entries, key=lambda e: (-_LAYOUT_RANK.get(e[1], 0), e[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, _, n in order:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header so that the data starts 8-aligned
        part = self.folder / f".{self.prefix}-part-{len(self._parts) + 1:05d}.safetensors"
        data = self._data_file()
        with open(part, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for _, _, _, pos, n in order:
                data.seek(pos)
                while n:
                    chunk = data.read(min(n, _COPY_CHUNK))
                    out.write(chunk)
                    n -= len(chunk)
        self._close_data()
        self._parts.append((part, [e[0] for e in order]))
        self._entries, self._shard_bytes = [], 0

    def _close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            Path(self._data.name).unlink(missing_ok=True)
            self._data = None

    def close(self) -> list[Path]:
        """Write the last shard, name the shards, write the index; return the files written."""
        if self.files is not None:
            return self.files
        if self._entries or not self._parts:  # an empty checkpoint is one empty file
            self._write_shard()
        n = len(self._parts)
        if n == 1:
            final = self.folder / f"{self.prefix}.safetensors"
            os.replace(self._parts[0][0], final)
            self.files = [final]
            return self.files
        weight_map, files = {}, []
        for i, (part, names) in enumerate(self._parts, 1):
            final = self.folder / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(part, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        index_path = self.folder / f"{self.prefix}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.files = [*files, index_path]
        return self.files

    def abort(self) -> None:
        """Remove the shards and data written so far (nothing is renamed or indexed)."""
        self._close_data()
        for part, _ in self._parts:
            part.unlink(missing_ok=True)
        self._parts, self._entries, self._shard_bytes = [], [], 0
        self.files = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
