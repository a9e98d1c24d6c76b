"""Calibration: read text, cut it into token windows, record per-input-channel activation abs-max.

The statistic is what SmoothQuant and static activation scales need: for every quantizable linear
layer, ``amax[j] = max |x[..., j]|`` over all calibration tokens, recorded with forward hooks.
Statistics are plain tensors keyed by module name and can be saved to / loaded from safetensors.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import QuantkitError

log = logging.getLogger(__name__)

ActStats = dict[str, torch.Tensor]

# Shipped inside the package (an installed wheel has no repository around it).
DEFAULT_CALIBRATION = Path(str(importlib.resources.files("quantkit") / "data" / "persuasion.txt"))


def read_texts(path: str | Path) -> list[str]:
    """Calibration texts from a ``.txt`` file (one text) or ``.jsonl`` (a ``"text"`` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"calibration file {path} does not exist; pass a .txt or .jsonl file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(
            f"calibration file {path} is not UTF-8 (bad byte at offset {e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt"
        ) from None
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantkitError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise QuantkitError(f'{path}:{lineno} has no string "text" field; each line must be {{"text": ...}}')
            texts.append(record["text"])
    else:
        texts = [content]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QuantkitError(f"calibration file {path} contains no text; give it some representative text")
    return texts


def make_samples(tokenizer, texts: list[str], n_samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token ids: ``n_samples`` non-overlapping windows spread evenly over the text.

    Texts are joined with the tokenizer's EOS token. Evenly spaced windows make the choice
    deterministic (no RNG to seed) and cover the whole text rather than its opening chapters.
    """
    if n_samples < 1 or seq_len < 2:
        raise QuantkitError("calibration needs at least 1 sample of at least 2 tokens")
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        log.warning("calibration text has only %d tokens (< %d); using one short sample", len(ids), seq_len)
        return ids[None, :]
    if n_windows < n_samples:
        log.warning("calibration text holds only %d windows of %d tokens; using all of them", n_windows, seq_len)
        n_samples = n_windows
    starts = torch.linspace(0, n_windows - 1, n_samples).round().long() * seq_len
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@contextlib.contextmanager
def recording_amax(modules: dict[str, nn.Module]) -> Iterator[ActStats]:
    """Inside the block, every forward of a module in ``modules`` updates the yielded statistics
    with the per-input-channel abs-max of its input (fp32, on the CPU)."""
    stats: ActStats = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            prev = stats.get(name)
            stats[name] = amax if prev is None else torch.maximum(prev, amax)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    missing = set(modules) - set(stats)
    if missing:
        log.warning("%d modules saw no input during calibration (e.g. %s)", len(missing), sorted(missing)[0])


@torch.no_grad()
def collect_stats(
    model: nn.Module, samples: torch.Tensor, modules: dict[str, nn.Module], *, progress: bool = True
) -> ActStats:
    """Per-input-channel abs-max of the input of each module in ``modules``, over all ``samples``."""
    device = next(model.parameters()).device
    with recording_amax(modules) as stats:
        for row in tqdm(samples, desc="Calibrating", unit="sample", disable=not progress):
            model(input_ids=row[None, :].to(device), use_cache=False)
    return stats


def save_stats(stats: ActStats, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path), metadata=metadata or {})


def read_stats(path: str | Path) -> tuple[ActStats, dict[str, str]]:
    """Statistics saved by :func:`save_stats` and their metadata (e.g. the source model's fingerprint).

    A missing, damaged or non-statistics file is a :class:`QuantkitError`, as are non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"statistics file {path} does not exist; create it with quantkit calibrate")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            stats = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QuantkitError(f"statistics file {path} is not a readable safetensors file ({reason})") from None
    for name, t in stats.items():
        if t.dim() != 1 or not t.is_floating_point():
            raise QuantkitError(f"{path}: {name} is not a 1-D float tensor; not a quantkit statistics file")
        if not torch.isfinite(t).all():
            raise QuantkitError(f"{path}: statistics for {name} hold NaN or Inf; recalibrate")
    return stats, metadata


def load_stats(path: str | Path) -> ActStats:
    """The statistics of :func:`read_stats`, without the metadata."""
    return read_stats(path)[0]


def read_stats_for(file: str | Path, path: str | Path, fingerprint: str | None) -> ActStats:
    """Statistics from ``quantkit calibrate`` for the model at ``path`` (whose weights' fingerprint is
    ``fingerprint``), refused if they were recorded on another model."""
    stats, metadata = read_stats(file)
    recorded = metadata.get("fingerprint")
    if not recorded:
        log.warning("statistics %s do not record the model they came from; cannot check they are this one's", file)
    elif fingerprint and recorded != fingerprint:
        raise QuantkitError(
            f"statistics {file} were recorded on another model ({metadata.get('model', '?')}), not {path}; "
            "recalibrate with quantkit calibrate"
        )
    return stats
