"""Timing generation as quantkit serves it: prefill and decode through a static-cache decoder.

The decoder is :class:`~quantkit.evaluation.fastgen.StaticDecoder` (``quantkit.Generator``).

:func:`speed_static` is what ``quantkit eval`` reports (see the speed protocol in
:mod:`quantkit.evaluation.measure`); :func:`time_prefill` and :func:`time_decode` are its parts, also
used by ``eval/bench_model_gpu.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fastgen import StaticDecoder, model_device
from .measure import DECODE_PROMPT_TOKENS


@dataclass(frozen=True)
class Timing:
    """A timed operation: median ``seconds`` per run over ``samples``, ``tokens`` processed per run."""

    seconds: float
    tokens: int
    samples: tuple[float, ...]
    # "cuda_graph" / "cpu_graph" (decode replayed from a graph), "cuda" (eager launches, CUDA
    # events) or "cpu" (eager).
    method: str
    # Seconds the CPU graph took to record and build (once, before the timed runs); None without one.
    capture_seconds: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _time_runs(
    fn: Callable[[], object], setup: Callable[[], object], device: torch.device, repeats: int
) -> list[float]:
    """Seconds of ``fn`` per run, ``setup`` untimed before each; one untimed warm-up run first.

    On CUDA the device is idle when the start event is recorded, so the time includes the host's
    launch overhead (the thing CUDA graphs remove), and ends when the last kernel finishes.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    samples = []
    for i in range(1 + repeats):
        setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        if i > 0:
            samples.append(seconds)
    return samples


def _prompt(model: nn.Module, n_tokens: int, batch_size: int, prompt: torch.Tensor | None, seed: int) -> torch.Tensor:
    """``[batch_size, n_tokens]`` token ids: the start of ``prompt``, or seeded random ids (speed does
    not depend on token values)."""
    if prompt is not None:
        prompt = prompt if prompt.dim() == 2 else prompt[None, :]
        if prompt.shape[1] < n_tokens:
            raise ValueError(f"prompt has {prompt.shape[1]} tokens, fewer than the {n_tokens} asked for")
        return prompt[:, :n_tokens].expand(batch_size, -1).to(model_device(model))
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, n_tokens), generator=gen).to(model_device(model))


def time_prefill(
    model: nn.Module,
    n_tokens: int,
    *,
    batch_size: int = 1,
    repeats: int = 5,
    prompt: torch.Tensor | None = None,
    seed: int = 0,
) -> Timing:
    """Time the prefill of an ``n_tokens`` prompt: one forward that fills a static cache.

    It is the forward :meth:`StaticDecoder.prefill` runs (logits of the last token only, as in
    ``generate``), timed without the cache reset. Median of ``repeats`` runs after a warm-up.
    """
    decoder = StaticDecoder(model, n_tokens + 1, batch_size, cuda_graph=False, cpu_graph=False)
    ids = _prompt(model, n_tokens, batch_size, prompt, seed)
    samples = _time_runs(lambda: decoder.prefill(ids, reset=False), decoder.reset, decoder.device, repeats)
    method = "cuda" if decoder.device.type == "cuda" else decoder.device.type
    return Timing(statistics.median(samples), n_tokens * batch_size, tuple(samples), method)


def time_decode(
    model: nn.Module,
    n_new: int,
    *,
    prompt_len: int = 128,
    batch_size: int = 1,
    repeats: int = 5,
    cuda_graph: bool | None = None,
    cpu_graph: bool | None = None,
    prompt: torch.Tensor | None = None,
    seed: int = 0,
) -> Timing:
    """Time ``n_new`` greedy decode steps after a ``prompt_len``-token prefill (the prefill is untimed).

    Each step feeds one token per row and produces the next, so ``tokens = n_new * batch_size``.
    On CUDA the steps are CUDA graph replays unless ``cuda_graph=False``, on the CPU replays of a
    recorded CPU graph unless ``cpu_graph=False`` (see :class:`StaticDecoder`). Median of ``repeats``
    runs after a warm-up run; the graph is captured before it, untimed.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be at least 1, got {n_new}")
    decoder = StaticDecoder(model, prompt_len + 1 + n_new, batch_size, cuda_graph=cuda_graph, cpu_graph=cpu_graph)
    ids = _prompt(model, prompt_len, batch_size, prompt, seed)
    samples = _time_runs(lambda: decoder.decode(n_new), lambda: decoder.prefill(ids), decoder.device, repeats)
    if decoder.uses_cuda_graph or decoder.uses_cpu_graph:
        method = "cuda_graph" if decoder.uses_cuda_graph else "cpu_graph"
    else:
        method = decoder.device.type
    return Timing(statistics.median(samples), n_new * batch_size, tuple(samples), method, decoder.capture_seconds)


@torch.no_grad()
def speed_static(
    model: nn.Module, ids: torch.Tensor, *, prefill_tokens: int = 512, decode_tokens: int = 32, repeats: int = 3
) -> dict[str, Any]:
    """The figures of :func:`speed`, measured as quantkit serves the model (``quantkit eval`` uses this).

    Eager ``generate()`` spends most of a decode step in Python (on a GPU it is launch-bound), so
    decode runs :class:`~quantkit.evaluation.fastgen.StaticDecoder` after a ``DECODE_PROMPT_TOKENS``
    prompt: a static KV cache, and each step one CUDA-graph replay on a GPU, one CPU-graph replay on
    the CPU (``method`` says which; eager where the model's step cannot be captured). The capture
    happens once, before the timed runs; ``capture_seconds`` reports the CPU graph's. Prefill is
    the same decoder's forward over a ``prefill_tokens`` prompt. On CUDA, peak memory is the
    allocator's peak while decoding (weights, KV cache, activations). Medians of ``repeats`` runs
    after a warm-up, timed with CUDA events on a GPU.
    """
    device = next(model.parameters()).device
    prompt = ids[:prefill_tokens][None, :].to(device)
    prefill = time_prefill(model, prompt.shape[1], prompt=prompt, repeats=repeats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    decode = time_decode(
        model, decode_tokens, prompt_len=DECODE_PROMPT_TOKENS, prompt=prompt[:, :DECODE_PROMPT_TOKENS], repeats=repeats
    )
    out = {
        "prefill_tokens": prompt.shape[1],
        "prefill_tok_s": prefill.tokens_per_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode.tokens_per_s,
        "method": decode.method,
    }
    if decode.capture_seconds is not None:
        out["capture_seconds"] = decode.capture_seconds
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
