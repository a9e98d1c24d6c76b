"""Measurements: perplexity drift, weight bytes, prefill and decode speed.

Perplexity protocol (fixed, so numbers compare across runs and tools):
  the evaluation text (default: Jane Austen's *Emma*, never used for calibration) is tokenized
  whole without special tokens and cut into non-overlapping windows of ``window`` tokens
  (default 512); ``n_windows`` of them (default 32), evenly spaced over the book, are scored. Each
  window is an independent sequence: the loss is the mean next-token negative log-likelihood
  over its ``window - 1`` predicted tokens, and perplexity is ``exp`` of the mean over all windows.
  A model whose tokenizer adds a BOS token (Llama-2, Gemma) gets it as the first token of every
  window, followed by ``window - 1`` tokens of text, as lm-eval does (:func:`windows`).

Speed protocol: prefill is one forward pass over a ``prefill_tokens`` prompt as ``generate()``
runs it (tokens/s = prompt length / time): it fills the KV cache and computes the logits of the last
position only (``logits_to_keep=1``), the time to the first token; scoring every position is the
perplexity workload, not a prefill. Decode is greedy generation with the KV cache, prefill excluded.
Two ways of running them: :func:`quantkit.evaluation.speed.speed_static` (what ``quantkit eval``
reports) as quantkit serves a model, with a static KV cache and each decode step a replayed CUDA or
CPU graph; :func:`speed`, Hugging Face's eager ``generate()`` timed as
``(t(1 + n new tokens) - t(1 new token)) / n`` (the "HF eager" rows of ``eval/bench_cpu.py``).
Each figure is the median of ``repeats`` runs after a warm-up run.

Memory protocol (:func:`peak_memory`, Linux only): each model is measured in a fresh Python process,
so nothing another model allocated or the allocator kept is counted. The process first imports and
initializes the libraries (it builds the model's skeleton on the meta device, without weights,
loads quantkit's compiled CPU kernels and runs one small matmul to start the thread pool and BLAS),
then records its resident set size (RSS) as the baseline. It loads the model, runs one warm-up
``generate`` (one-time allocations), returns freed heap memory to the OS (``malloc_trim``), resets
the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the same greedy ``generate`` as the
decode measurement and reads the peak RSS (``VmHWM``). The figure is peak minus baseline: the
weights (whether in anonymous memory or mapped from the checkpoint file), KV cache, activations,
and the kernel code that generating touches, without the interpreter and libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.resources
import inspect
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DEFAULT_EVAL_WINDOW, DEFAULT_EVAL_WINDOWS
from ..core.modules import QUANT_MODULES, embeddings_of, is_float_linear
from ..errors import QuantkitError

log = logging.getLogger(__name__)

DEFAULT_EVAL_TEXT = Path(str(importlib.resources.files("quantkit") / "data" / "emma.txt"))  # in the package
# Prompt length of the decode measurement (speed and peak memory).
DECODE_PROMPT_TOKENS = 16


def read_eval_text(text_path: str | Path | None = None) -> str:
    """The evaluation text (shipped Emma by default); a missing, non-UTF-8 or empty file is an error."""
    path = Path(text_path or DEFAULT_EVAL_TEXT)
    if not path.is_file():
        raise QuantkitError(f"evaluation text {path} not found; pass --text FILE")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"evaluation text {path} is not UTF-8; convert it first") from None
    if not text.strip():
        raise QuantkitError(f"evaluation text {path} is empty")
    return text


def eval_token_ids(tokenizer, text_path: str | Path | None = None) -> torch.Tensor:
    text = read_eval_text(text_path)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def bos_id(tokenizer) -> int | None:
    """The BOS token the tokenizer puts before every text it encodes (Llama-2, Gemma), else None
    (SmolLM2, Llama-3's base tokenizers that add nothing, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return bos if len(with_special) > len(plain) and with_special[0] == bos else None


def windows(
    ids: torch.Tensor,
    window: int = DEFAULT_EVAL_WINDOW,
    n_windows: int = DEFAULT_EVAL_WINDOWS,
    bos: int | None = None,
) -> torch.Tensor:
    """``[n, window]`` evenly spaced non-overlapping windows (the protocol above).

    With ``bos`` (:func:`bos_id`), each window is that token and ``window - 1`` tokens of text, as
    lm-eval scores such models: a model trained with a BOS token is far worse without one (about
    2.5x the perplexity), which would drown the drift being measured. The number of predicted tokens
    is ``window - 1`` either way.
    """
    step = window - 1 if bos is not None else window
    total = len(ids) // step
    if total == 0:
        raise QuantkitError(f"evaluation text has {len(ids)} tokens, fewer than one {window}-token window")
    n = min(n_windows, total)
    starts = torch.linspace(0, total - 1, n).round().long() * step
    rows = [ids[s : s + step] for s in starts.tolist()]
    if bos is not None:
        rows = [torch.cat([torch.tensor([bos], dtype=ids.dtype), r]) for r in rows]
    return torch.stack(rows)


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
    head = embeddings_of(model)[1]
    quant_types = tuple(QUANT_MODULES.values())
    for module in model.modules():
        if (is_float_linear(module) or isinstance(module, quant_types)) and module is not head:
            n = sum(t.numel() * t.element_size() for t in module.state_dict().values() if t is not None)
            linear += n
            quantized += n if isinstance(module, quant_types) else 0
    return {"total": total, "linear": linear, "quantized_linear": quantized}


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # first-call allocations, kernel selection, compilation
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def greedy_generate(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Exactly ``n`` greedy tokens after the prompt ``ids`` ``[1, T]``: the decode measurement's workload
    (speed and peak memory run the same one)."""
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )


@torch.no_grad()
def speed(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    prefill_tokens: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: bool = True,
) -> dict[str, float]:
    """Prefill and decode tokens/s for ``model`` (see the protocol in the module docstring).

    ``warmup=False`` skips the warm-up runs, for callers that interleave several models' runs
    (``eval/bench_cpu.py``) and have warmed each model up once already.
    """
    device = next(model.parameters()).device
    prompt = ids[:prefill_tokens][None, :].to(device)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    t_prefill = _timed(lambda: model(input_ids=prompt, use_cache=True, **last_only), device, repeats, warmup)
    short = ids[:DECODE_PROMPT_TOKENS][None, :].to(device)

    t1 = _timed(lambda: greedy_generate(model, short, 1), device, repeats, warmup)
    tn = _timed(lambda: greedy_generate(model, short, 1 + decode_tokens), device, repeats, warmup)
    return {
        "prefill_tokens": prompt.shape[1],
        "prefill_tok_s": prompt.shape[1] / t_prefill,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / max(tn - t1, 1e-9),
    }


PEAK_MEMORY_METHOD = (
    "peak RSS (VmHWM) during generate() in a fresh process, reset after loading and a warm-up run, "
    "minus the RSS with libraries initialized before loading the weights"
)
PEAK_MEMORY_METHOD_CUDA = (
    "peak of the CUDA allocator (max_memory_allocated) while decoding: weights, KV cache, activations"
)


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise QuantkitError(f"/proc/self/status has no {field}")


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def return_large_blocks(threshold: int = 4 * 2**20) -> None:
    """Make glibc hand freed memory back to the OS, for a loop that allocates and frees a layer's
    tensors over and over (the layer-by-layer conversion); set once, for the rest of the process.

    * Every allocation of ``threshold`` bytes or more gets its own mapping, which goes back to the
      OS when freed. By default glibc raises that threshold (up to 32 MiB) each time a large block
      is freed and then keeps such blocks on its heap: resident memory grows by about a layer's worth
      at a time.
    * One heap for all threads. By default each thread that allocates (the intra-op worker threads
      do) gets heaps of its own, which ``malloc_trim`` empties less well: in some runs, depending on
      which thread freed what, ~150 MiB more stayed resident through the whole conversion. Threads
      that have allocated already keep their heaps, so call this before the first parallel work.

    A no-op where the C library is not glibc.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "mallopt"):
            libc.mallopt(_M_MMAP_THRESHOLD, threshold)
            libc.mallopt(_M_ARENA_MAX, 1)


def release_free_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS counts live memory only."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):  # glibc; other C libraries return memory on their own
            libc.malloc_trim(0)


def _peak_memory_child(spec: dict[str, Any]) -> dict[str, int]:
    """Runs in the fresh process started by :func:`peak_memory`; see the memory protocol above."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..formats.float_models import load_float
    from ..formats.native import load
    from ..kernels import cpu_fused

    torch.set_grad_enabled(False)
    # Building the model skeleton on the meta device (no weights) imports and initializes every
    # library the real load needs (~200 MiB of RSS for transformers' model code): that belongs to
    # the baseline, not to the model.
    config = AutoConfig.from_pretrained(spec["path"])
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        AutoModelForCausalLM.from_config(config)
    dtype = getattr(torch, spec["dtype"])
    # Also library costs: quantkit's compiled CPU kernels (loading them imports
    # torch.utils.cpp_extension, ~4 MiB), and the intra-op thread pool and BLAS, started by one
    # small matmul. Done for every model alike.
    cpu_fused.module()
    torch.nn.functional.linear(torch.ones(64, 256, dtype=dtype), torch.ones(256, 256, dtype=dtype))
    release_free_heap()
    baseline = status_bytes("VmRSS")
    if spec["kind"] == "float":
        model, tokenizer, _ = load_float(spec["path"], dtype=dtype, progress=False)
        del tokenizer  # not part of the model; freed before the peak is reset
    else:
        model = load(spec["path"], dtype=dtype)
    ids = torch.tensor([spec["prompt"]])
    n = spec["decode_tokens"]

    greedy_generate(model, ids, n)
    release_free_heap()
    # Writing "5" resets VmHWM to the current RSS (Linux >= 4.0, see proc(5)).
    Path("/proc/self/clear_refs").write_text("5")
    greedy_generate(model, ids, n)
    peak = status_bytes("VmHWM")
    return {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "peak_memory_bytes": peak - baseline}


def peak_memory(
    path: str | Path, *, kind: str, dtype: str, prompt: torch.Tensor, decode_tokens: int = 32, timeout: float = 900
) -> dict[str, int] | None:
    """Peak memory of generating with a model, measured in a fresh process (protocol above).

    Args:
        path: a float model folder (``kind="float"``) or a quantkit checkpoint (``kind="quantized"``).
        dtype: activation dtype name, e.g. ``"bfloat16"``.
        prompt: 1-D token ids, the same prompt as the decode measurement.

    Returns:
        ``{"peak_memory_bytes", "peak_rss_bytes", "baseline_rss_bytes"}``, or None where it cannot be
        measured (not Linux) or the measuring process failed; the reason is logged.
    """
    if not Path("/proc/self/clear_refs").exists():
        log.warning("peak memory needs Linux's /proc/self/clear_refs; not measured")
        return None
    spec = {
        "kind": kind,
        "path": str(path),
        "dtype": dtype,
        "prompt": [int(t) for t in prompt.reshape(-1)],
        "decode_tokens": decode_tokens,
    }
    code = (
        "import json, sys; from quantkit.evaluation.measure import _peak_memory_child as f; "
        "print('QUANTKIT_RESULT ' + json.dumps(f(json.loads(sys.argv[1]))))"
    )
    # The child must import this same quantkit, wherever it is installed or checked out.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if proc.returncode == 0 and line.startswith("QUANTKIT_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    log.error("measuring the peak memory of %s failed (exit %d):\n%s", path, proc.returncode, tail)
    return None


def environment() -> dict[str, Any]:
    """Machine and versions, so every number in a report says where it came from."""
    import transformers

    from .._version import __version__

    env: dict[str, Any] = {
        "quantkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


# The CPU features the int8 and bf16 kernels depend on (what /proc/cpuinfo calls them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimd")


def cpu_features() -> dict[str, Any]:
    """What the CPU offers the kernels: its flags among :data:`CPU_FLAGS`, the instruction set torch
    dispatches to, and the GEMVs quantkit's fused W8A8 and W8A16 kernels use at a few rows (None when
    the extension is not loaded in this process)."""
    from ..kernels import cpu_fused

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "flags": [f for f in CPU_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int8_gemv": cpu_fused.gemv_kind(),
        "w8a16_gemv": cpu_fused.w16_gemv_kind(),
        "int8_gemm": cpu_fused.int8_gemm_kind(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
