"""CPU benchmark: fp32, bf16, W8A16 and W8A8 per layer and per model, measured in the same run.

Per layer: the default model's linear shapes (576->576 q/o, 576->192 k/v, 576->1536 gate/up,
1536->576 down) at M rows in {1, 4, 16, 64, 512}, each through the module a model would run:
``nn.Linear`` in fp32 and bf16, :class:`quantkit.core.modules.W8A16Linear` and :class:`quantkit.core.modules.W8A8Linear`
(dynamic per-token activations) with bf16 activations, so the quantized rows go through
:mod:`quantkit.kernels`' dispatch (the chosen backend is recorded). With ``--cache cold`` (default)
every call uses the next of enough copies of the weights to exceed the last-level cache twice over,
so weights come from memory as they do in a model's forward pass; ``--cache hot`` reuses one
weight. Each figure is the median over ``--rounds`` rounds; within a round the four methods run
back to back, so load changes on the machine hit them alike.

Per model (default model unless ``--model``): prefill tok/s over 512 tokens, decode tok/s and peak
memory while generating, with the protocols of :mod:`quantkit.evaluation.measure`. Two ways of
running each model:

- ``fp32``, ``bf16``, ``w8a16``, ``w8a8``: Hugging Face's eager ``generate()``
  (:func:`~quantkit.evaluation.measure.speed`), what a user of transformers runs;
- ``... graph``: as quantkit serves it and ``quantkit eval`` reports it
  (:func:`~quantkit.evaluation.speed.speed_static`): a static KV cache and each decode step a
  replayed CPU graph (:mod:`quantkit.evaluation.cpu_graph`); the capture time is recorded apart;
- ``llama.cpp q8_0`` (with ``--llama-cpp FILE.gguf``): the same model converted to GGUF Q8_0 with
  llama.cpp's ``convert_hf_to_gguf.py --outtype q8_0``, run by llama-cpp-python with as many threads
  as torch uses, the same prompt token ids, greedy decoding (argmax of its logits).

Quantized models run with bf16 activations and quantkit's defaults: the tied embedding/lm_head is
one int8 table, lm_head weight-only. Rounds interleave all rows in one process. Peak memory is
measured in a fresh process per model for the eager rows (:func:`quantkit.evaluation.measure.peak_memory`).

Every ratio is ``method / fp32`` and ``method / bf16`` of figures from this run. The W8A16 and
W8A8 checkpoints are made here (calibration on the shipped text) unless ``--checkpoints DIR``
names a folder holding ``w8a16/`` and ``w8a8/`` from an earlier run (``--save-checkpoints DIR``).

Run it alone on the machine (timings are meaningless when other processes compete for the cores)::

    flock /tmp/quantkit-cpu.lock python eval/bench_cpu.py --out bench_cpu.json
    python eval/bench_cpu.py --skip-model --rounds 3           # per layer only
    python eval/bench_cpu.py --skip-layers --llama-cpp smollm2-q8_0.gguf   # with a llama.cpp row

llama-cpp-python is not a quantkit dependency: ``pip install llama-cpp-python`` builds it from its
source distribution (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quantkit
from quantkit import kernels
from quantkit.core.modules import W8A8Linear, W8A16Linear
from quantkit.evaluation import measure as evaluate
from quantkit.evaluation.speed import speed_static

log = logging.getLogger("bench_cpu")

# in_features x out_features of the default model's linears.
DEFAULT_SHAPES = "576x576,576x192,576x1536,1536x576"
DEFAULT_ROWS = "1,4,16,64,512"
METHODS = ("fp32", "bf16", "w8a16", "w8a8")
# Share of the CPUs that other processes (or the hypervisor) may take during a timed run before it
# is flagged as contaminated.
CONTENTION_WARN = 0.05
# Bytes of weight copies per method in --cache cold: twice the 32 MiB L3 of the reference machine.
COLD_BYTES = 64 << 20


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _cpu_counters() -> tuple[float, float]:
    """CPU seconds all processes on the machine have used (user, nice, system, irq), and the seconds
    the hypervisor ran something else on this machine's CPUs (steal), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _contention(fn: Callable[[], Any]) -> tuple[Any, dict[str, float] | None]:
    """``fn()``, and the shares of the machine's CPU time (0..1) that other processes used and that
    the hypervisor stole meanwhile. Timings mean something only when both are ~0; they are recorded
    so that a contaminated run shows.
    """
    if not Path("/proc/stat").is_file():
        return fn(), None
    wall0, (busy0, steal0), self0 = time.perf_counter(), _cpu_counters(), time.process_time()
    result = fn()
    (busy, steal), own = _cpu_counters(), time.process_time() - self0
    capacity = (time.perf_counter() - wall0) * (os.cpu_count() or 1)
    return result, {"foreign": max(0.0, busy - busy0 - own) / capacity, "steal": (steal - steal0) / capacity}


def _layer_modules(k: int, n: int, copies: int) -> dict[str, list[nn.Module]]:
    """``copies`` independent modules per method for an ``k -> n`` linear (bias-free, like Llama's)."""
    torch.manual_seed(k * 7 + n)
    base = nn.Linear(k, n, bias=False)
    mods: dict[str, list[nn.Module]] = {m: [] for m in METHODS}
    for _ in range(copies):
        mods["fp32"].append(nn.Linear(k, n, bias=False).requires_grad_(False))
        mods["fp32"][-1].weight.copy_(base.weight)
        mods["bf16"].append(nn.Linear(k, n, bias=False, dtype=torch.bfloat16).requires_grad_(False))
        mods["bf16"][-1].weight.copy_(base.weight)
        mods["w8a16"].append(W8A16Linear.from_float(mods["bf16"][-1]))
        mods["w8a8"].append(W8A8Linear.from_float(mods["bf16"][-1]))
    return mods


def _time_calls(fn: Callable[[int], Any], calls: int) -> float:
    """Seconds per call of ``fn(i)``, ``i`` = 0..calls-1, after one untimed call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls


@torch.no_grad()
def bench_layers(shapes: list[tuple[int, int]], rows: list[int], rounds: int, cache: str) -> list[dict[str, Any]]:
    results = []
    for k, n in shapes:
        copies = max(1, COLD_BYTES // (k * n)) if cache == "cold" else 1
        mods = _layer_modules(k, n, copies)
        for m in rows:
            x = {"fp32": torch.randn(m, k)}
            for name in ("bf16", "w8a16", "w8a8"):
                x[name] = x["fp32"].bfloat16()
            # Enough calls for ~20 ms per timing, at least one pass over the copies.
            probe, xb = mods["bf16"][0], x["bf16"]
            calls = max(copies, 20, int(2e-2 / max(_time_calls(lambda i, probe=probe, xb=xb: probe(xb), 3), 1e-6)))
            times: dict[str, list[float]] = {name: [] for name in METHODS}
            for _ in range(rounds):
                for name in METHODS:
                    ms, xi = mods[name], x[name]
                    times[name].append(_time_calls(lambda i, ms=ms, xi=xi: ms[i % len(ms)](xi), calls))
            entry: dict[str, Any] = {"in": k, "out": n, "rows": m, "weight_copies": copies}
            entry["backend"] = {
                "w8a16": kernels.select("w8a16", x["w8a16"], mods["w8a16"][0].weight)[0],
                "w8a8": kernels.select("w8a8", x["w8a8"], mods["w8a8"][0].weight)[0],
            }
            entry["us"] = {name: _median(t) * 1e6 for name, t in times.items()}
            entry["x_fp32"] = {name: entry["us"]["fp32"] / entry["us"][name] for name in METHODS}
            entry["x_bf16"] = {name: entry["us"]["bf16"] / entry["us"][name] for name in METHODS}
            results.append(entry)
            log.info("layer %dx%d M=%d: %s", k, n, m, {a: round(b, 1) for a, b in entry["us"].items()})
    return results


def _make_checkpoints(model: str, out: Path) -> dict[str, Path]:
    float_model, tokenizer, path = quantkit.load_float(model, dtype=torch.float32, progress=False)
    stats = quantkit.calibrate(float_model, tokenizer, progress=False)
    del float_model
    paths = {}
    for name in ("w8a16", "w8a8"):
        m, _, _ = quantkit.load_float(path, dtype=torch.bfloat16, progress=False)
        quantkit.quantize(m, quantkit.QuantConfig(scheme=name), stats, progress=False)
        paths[name] = quantkit.save(m, out / name, tokenizer, overwrite=True)
    return paths


class LlamaCpp:
    """A GGUF model run by llama-cpp-python: prefill and greedy decode timed like the other rows."""

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        try:
            import llama_cpp
        except ImportError as e:
            raise SystemExit(f"--llama-cpp needs llama-cpp-python: pip install llama-cpp-python ({e})") from e
        if not gguf.is_file():
            raise SystemExit(f"--llama-cpp: {gguf} is not a file")
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=context, n_batch=context, n_ubatch=context,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )  # fmt: skip
        self.info = {
            "gguf": str(gguf),
            "llama_cpp_python": llama_cpp.__version__,
            "threads": threads,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        }

    def _next(self) -> int:
        return int(self.llm.scores[self.llm.n_tokens - 1].argmax())

    def speed(self, ids: torch.Tensor, prefill_tokens: int, decode_tokens: int) -> dict[str, float]:
        prompt = ids[:prefill_tokens].tolist()
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        self._next()  # the first token, as the other rows' prefill computes its logits
        prefill = time.perf_counter() - t0
        self.llm.reset()
        self.llm.eval(ids[: evaluate.DECODE_PROMPT_TOKENS].tolist())
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            self.llm.eval([self._next()])
        decode = time.perf_counter() - t0
        return {
            "prefill_tokens": len(prompt),
            "prefill_tok_s": len(prompt) / prefill,
            "decode_tokens": decode_tokens,
            "decode_tok_s": decode_tokens / decode,
        }


LLAMA_CPP_ROW = "llama.cpp q8_0"


@torch.no_grad()
def bench_model(
    model: str, checkpoints: dict[str, Path], rounds: int, prefill_tokens: int, llama_cpp: Path | None = None
) -> dict[str, Any]:
    from quantkit.formats.float_models import load_float

    models: dict[str, nn.Module] = {}
    models["fp32"], tokenizer, float_path = load_float(model, dtype=torch.float32, progress=False)
    models["bf16"] = load_float(float_path, dtype=torch.bfloat16, progress=False)[0]
    for name in ("w8a16", "w8a8"):
        models[name] = quantkit.load(checkpoints[name], dtype=torch.bfloat16)
    ids = evaluate.eval_token_ids(tokenizer)
    decode_tokens = 32
    runners: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, m in models.items():
        runners[name] = lambda m=m: evaluate.speed(m, ids, prefill_tokens=prefill_tokens, repeats=1, warmup=False)
    for name in ("bf16", "w8a16", "w8a8"):
        m = models[name]
        runners[f"{name} graph"] = lambda m=m: speed_static(m, ids, prefill_tokens=prefill_tokens, repeats=1)
    extra: dict[str, Any] = {}
    if llama_cpp is not None:
        runner = LlamaCpp(llama_cpp, torch.get_num_threads(), prefill_tokens + evaluate.DECODE_PROMPT_TOKENS)
        runners[LLAMA_CPP_ROW] = lambda: runner.speed(ids, prefill_tokens, decode_tokens)
        extra["llama_cpp"] = runner.info
    for name, run in runners.items():
        log.info("warming up %s", name)
        run()
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            result, contention = _contention(run)
            per_round[name].append({**result, "contention": contention})
            if contention and max(contention.values()) > CONTENTION_WARN:
                log.warning("round %d, %s: CPU contention %s", r, name, contention)
        log.info("round %d: decode tok/s %s", r, {n: round(v[-1]["decode_tok_s"], 2) for n, v in per_round.items()})
    out: dict[str, Any] = {
        "float_path": str(float_path),
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        **extra,
    }
    rows = {}
    for name, runs in per_round.items():
        rows[name] = {
            "prefill_tokens": runs[0]["prefill_tokens"],
            "prefill_tok_s": _median([r["prefill_tok_s"] for r in runs]),
            "decode_tokens": runs[0]["decode_tokens"],
            "decode_tok_s": _median([r["decode_tok_s"] for r in runs]),
            "max_contention": max((max(r["contention"].values()) if r["contention"] else 0.0) for r in runs),
            "rounds": runs,
            "peak_memory_bytes": None,
        }
        if "method" in runs[0]:
            rows[name]["decode_method"] = runs[0]["method"]
        captures = [r["capture_seconds"] for r in runs if "capture_seconds" in r]
        if captures:
            rows[name]["capture_seconds"] = _median(captures)
    del models
    prompt = ids[: evaluate.DECODE_PROMPT_TOKENS]
    sources = {"fp32": ("float", float_path, "float32"), "bf16": ("float", float_path, "bfloat16")}
    sources.update({name: ("quantized", checkpoints[name], "bfloat16") for name in ("w8a16", "w8a8")})
    for name, (kind, path, dtype) in sources.items():
        log.info("peak memory of %s (fresh process)", name)
        mem = evaluate.peak_memory(path, kind=kind, dtype=dtype, prompt=prompt)
        rows[name]["peak_memory_bytes"] = None if mem is None else mem["peak_memory_bytes"]
    for row in rows.values():
        for base in ("fp32", "bf16"):
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"{key}_x_{base}"] = row[key] / rows[base][key]
            mem, base_mem = row["peak_memory_bytes"], rows[base]["peak_memory_bytes"]
            row[f"peak_memory_x_{base}"] = None if mem is None or base_mem is None else mem / base_mem
        if LLAMA_CPP_ROW in rows:
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"{key}_x_llama_cpp"] = row[key] / rows[LLAMA_CPP_ROW][key]
    out["rows"] = rows
    out["peak_memory_method"] = evaluate.PEAK_MEMORY_METHOD
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def layer_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| in->out | M | fp32 us | bf16 us | W8A16 us (backend) | W8A8 us (backend) "
        "| W8A16 x fp32 / x bf16 | W8A8 x fp32 / x bf16 |"
    )
    lines = [head, "|" + "---|" * 8]
    for e in results:
        us, xf, xb, be = e["us"], e["x_fp32"], e["x_bf16"], e["backend"]
        lines.append(
            f"| {e['in']}->{e['out']} | {e['rows']} | {us['fp32']:.1f} | {us['bf16']:.1f} "
            f"| {us['w8a16']:.1f} ({be['w8a16']}) | {us['w8a8']:.1f} ({be['w8a8']}) "
            f"| {xf['w8a16']:.2f} / {xb['w8a16']:.2f} | {xf['w8a8']:.2f} / {xb['w8a8']:.2f} |"
        )
    return "\n".join(lines)


def model_table(model: dict[str, Any]) -> str:
    rows = model["rows"]
    llama = LLAMA_CPP_ROW in rows
    head = "| model | prefill tok/s | x fp32 | x bf16 | decode tok/s | x fp32 | x bf16 |"
    head += " prefill x llama.cpp | decode x llama.cpp |" if llama else ""
    head += " peak memory MiB | x bf16 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        mem = r["peak_memory_bytes"]
        line = (
            f"| {name} | {r['prefill_tok_s']:.1f} | {r['prefill_tok_s_x_fp32']:.2f} | {r['prefill_tok_s_x_bf16']:.2f} "
            f"| {r['decode_tok_s']:.2f} | {r['decode_tok_s_x_fp32']:.2f} | {r['decode_tok_s_x_bf16']:.2f} |"
        )
        if llama:
            line += f" {r['prefill_tok_s_x_llama_cpp']:.2f} | {r['decode_tok_s_x_llama_cpp']:.2f} |"
        line += f" {_fmt(None if mem is None else mem / 2**20, '.1f')} | {_fmt(r['peak_memory_x_bf16'], '.3f')} |"
        lines.append(line)
    captures = {name: r["capture_seconds"] for name, r in rows.items() if "capture_seconds" in r}
    if captures:
        lines.append("")
        each = ", ".join(f"{n} {s:.2f} s" for n, s in captures.items())
        lines.append(f"CPU graph capture (once per decoder, untimed): {each}")
    return "\n".join(lines)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        shapes.append((int(k), int(n)))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.add_argument("--model", default="smollm2-135m", help="float model for the per-model part (default: %(default)s)")
    p.add_argument("--checkpoints", type=Path, help="folder with w8a16/ and w8a8/ checkpoints to reuse")
    p.add_argument("--save-checkpoints", type=Path, help="keep the checkpoints made here in this folder")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="per-layer in x out shapes (default: %(default)s)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="per-layer row counts M (default: %(default)s)")
    p.add_argument("--cache", choices=("cold", "hot"), default="cold", help="per-layer weight cache state")
    p.add_argument("--layer-rounds", type=int, default=5, help="per-layer rounds (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="per-model rounds (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prefill prompt length (default: %(default)s)")
    p.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="GGUF",
        help="add a llama.cpp row running this GGUF file (e.g. the model converted to Q8_0); needs llama-cpp-python",
    )
    p.add_argument("--skip-layers", action="store_true", help="skip the per-layer part")
    p.add_argument("--skip-model", action="store_true", help="skip the per-model part")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    kernels.cpu_fused.module()  # built now, so that the results record which int8 GEMV it uses
    results: dict[str, Any] = {
        "schema": "quantkit.bench_cpu/1",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "environment": evaluate.environment(),
        "cpu": evaluate.cpu_features(),
        "backends": kernels.backends(),
        # ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS cap the instruction sets torch
        # uses (e.g. AVX2 to stand in for a CPU without AVX512-VNNI); the fused kernels' choices follow
        # QUANTKIT_GEMV / QUANTKIT_INT8_GEMM or the CPU.
        "env": {
            k: os.environ.get(k)
            for k in (
                "QUANTKIT_COMPILE",
                "QUANTKIT_KERNELS",
                "QUANTKIT_GEMV",
                "QUANTKIT_INT8_GEMM",
                "OMP_NUM_THREADS",
                "ONEDNN_MAX_CPU_ISA",
                "ATEN_CPU_CAPABILITY",
                "MKL_ENABLE_INSTRUCTIONS",
            )
        },
    }
    t0 = time.time()
    if not args.skip_model:
        with tempfile.TemporaryDirectory(prefix="quantkit-bench-") as tmp:
            if args.checkpoints:
                checkpoints = {name: args.checkpoints / name for name in ("w8a16", "w8a8")}
            else:
                log.info("quantizing %s (calibration on the shipped text)", args.model)
                checkpoints = _make_checkpoints(args.model, args.save_checkpoints or Path(tmp))
            results["model"] = bench_model(
                args.model, checkpoints, args.rounds, args.prefill_tokens, llama_cpp=args.llama_cpp
            )
    if not args.skip_layers:
        shapes, rows = _parse_shapes(args.shapes), [int(r) for r in args.rows.split(",")]
        results["layers"] = {
            "cache": args.cache,
            "rounds": args.layer_rounds,
            "results": bench_layers(shapes, rows, args.layer_rounds, args.cache),
        }
        print("Per layer (us per call, median of rounds; ratios are speedups, higher is faster)")
        print(layer_table(results["layers"]["results"]))
    if "model" in results:
        print(f"\nPer model ({args.model}; quantized models with bf16 activations; medians of {args.rounds} rounds)")
        print(model_table(results["model"]))
        worst = max(r["max_contention"] for r in results["model"]["rows"].values())
        print(f"Other processes or the hypervisor took at most {100 * worst:.1f} % of the CPUs during a timed run.")
    results["wall_seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
