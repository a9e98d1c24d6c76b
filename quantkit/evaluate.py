"""Measurements: perplexity drift, weight bytes, prefill and decode speed.

Perplexity protocol (fixed, so numbers compare across runs and tools):
  the evaluation text (default: Jane Austen's *Emma*, never used for calibration) is tokenized
  whole without special tokens and cut into non-overlapping windows of ``window`` tokens
  (default 512); ``n_windows`` of them (default 32), evenly spaced over the book, are scored. Each
  window is an independent sequence: the loss is the mean next-token negative log-likelihood
  over its ``window - 1`` predicted tokens, and perplexity is ``exp`` of the mean over all windows.

Speed protocol: prefill is one forward pass over a ``prefill_tokens`` prompt (tokens/s = prompt
length / time); decode is greedy generation with the KV cache, timed as
``(t(1 + n new tokens) - t(1 new token)) / n`` so that the prefill is excluded. Each figure is the
median of ``repeats`` runs after a warm-up run.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import QuantkitError
from .nn import QUANT_MODULES, is_float_linear

log = logging.getLogger(__name__)

DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent.parent / "eval" / "emma.txt"
DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 32


def eval_token_ids(tokenizer, text_path: str | Path | None = None) -> torch.Tensor:
    path = Path(text_path or DEFAULT_EVAL_TEXT)
    if not path.is_file():
        raise QuantkitError(f"evaluation text {path} not found; pass --text FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"evaluation text {path} is not UTF-8; convert it first") from None
    if not text.strip():
        raise QuantkitError(f"evaluation text {path} is empty")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def windows(ids: torch.Tensor, window: int = DEFAULT_WINDOW, n_windows: int = DEFAULT_WINDOWS) -> torch.Tensor:
    """``[n, window]`` evenly spaced non-overlapping windows (the protocol above)."""
    total = len(ids) // window
    if total == 0:
        raise QuantkitError(f"evaluation text has {len(ids)} tokens, fewer than one {window}-token window")
    n = min(n_windows, total)
    starts = torch.linspace(0, total - 1, n).round().long() * window
    return torch.stack([ids[s : s + window] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, batch: torch.Tensor, *, progress: bool = True, desc: str = "Perplexity") -> float:
    device = next(model.parameters()).device
    nll = 0.0
    for row in tqdm(batch, desc=desc, unit="window", disable=not progress):
        x = row[None, :].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        # fp32 log-softmax: bf16 logits would add their own error to the perplexity.
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="mean").item()
    return math.exp(nll / len(batch))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held in memory: all parameters and buffers, and the part in linear layers.

    ``linear`` counts every float or quantized linear layer's weight (+ scales, pre-scales), which
    is what quantization shrinks; ``total`` also counts embeddings, norms and ``lm_head``.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    linear = 0
    quantized = 0
    for module in model.modules():
        is_linear = is_float_linear(module) or isinstance(module, tuple(QUANT_MODULES.values()))
        if is_linear and module is not _output_embeddings(model):
            n = sum(t.numel() * t.element_size() for t in module.state_dict().values() if t is not None)
            linear += n
            quantized += n if isinstance(module, tuple(QUANT_MODULES.values())) else 0
    return {"total": total, "linear": linear, "quantized_linear": quantized}


def _output_embeddings(model: nn.Module):
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, kernel selection, compilation
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    prefill_tokens: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> dict[str, float]:
    """Prefill and decode tokens/s for ``model`` (see the protocol in the module docstring)."""
    device = next(model.parameters()).device
    prompt = ids[:prefill_tokens][None, :].to(device)
    t_prefill = _timed(lambda: model(input_ids=prompt, use_cache=False), device, repeats)
    short = ids[:16][None, :].to(device)

    def gen(n: int):
        return model.generate(
            input_ids=short,
            attention_mask=torch.ones_like(short),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    t1 = _timed(lambda: gen(1), device, repeats)
    tn = _timed(lambda: gen(1 + decode_tokens), device, repeats)
    return {
        "prefill_tokens": prompt.shape[1],
        "prefill_tok_s": prompt.shape[1] / t_prefill,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / max(tn - t1, 1e-9),
    }


def environment() -> dict[str, Any]:
    """Machine and versions, so every number in a report says where it came from."""
    import transformers

    from . import __version__

    env: dict[str, Any] = {
        "quantkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
