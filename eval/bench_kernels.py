"""Time one MLP block (gate, up, down) through each quantized path against bf16 cuBLAS on a GPU.

For every row count M it times, in the same process and on the same inputs, one call of the whole
block (three linears, no activation function between them) through:

- ``bf16_cublas``: ``F.linear`` with the float weights, the baseline every ratio is taken against;
- ``w8a16_triton``: :func:`quantkit.kernels.triton_kernels.w8a16_linear`;
- ``w8a8_triton``: :func:`quantkit.kernels.triton_kernels.w8a8_linear` (activation quantization
  fused into the GEMM);
- ``w8a8_triton_2pass``: the same GEMM on activations quantized by a separate kernel first;
- ``w8a8_int_mm``: the ``cuda_int_mm`` backend (``torch._int_mm``), where its shape rules allow;
- with ``--reference``: the reference implementations.

Each method's outputs are also compared with the float product (fp32 matmul of the same activations
and the unquantized weights) and the SQNR is reported. Times are per block call in microseconds,
medians over repetitions, taken by replaying a CUDA graph (``--no-cuda-graphs`` for plain launches
timed with CUDA events); ``speedup = t_bf16 / t_method``. Weights and activations are synthetic
(seeded Gaussian weights, activations with a few x8 outlier channels), which is all that timing
needs; the SQNR figures are for that data only.

Example::

    python eval/bench_kernels.py --out results.json
    python eval/bench_kernels.py --m 1,16,2048 --shapes 4096x14336,4096x14336,14336x4096 --reference
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("bench_kernels")

# in_features x out_features of each linear in the block: an 8B Llama MLP (gate, up, down).
DEFAULT_SHAPES = "4096x14336,4096x14336,14336x4096"
DEFAULT_ROWS = "1,2,4,8,16,32,64,256,2048"
BASELINE = "bf16_cublas"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Linear:
    """One linear of the block: float weight [N, K] and its int8 per-channel quantization."""

    weight: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor


Method = Callable[[Linear, torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="comma-separated KxN (in_features x out_features) per linear of the block "
        f"(default: {DEFAULT_SHAPES}, an 8B Llama MLP)",
    )
    parser.add_argument("--m", default=DEFAULT_ROWS, help=f"comma-separated row counts (default: {DEFAULT_ROWS})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype (default: bf16)")
    parser.add_argument("--reference", action="store_true", help="also time the reference implementations")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="time plain launches instead of CUDA graph replays"
    )
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement in ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x14336,14336x4096"`` -> ``[(4096, 14336), (14336, 4096)]`` as (K, N)."""
    shapes = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        shapes.append((int(k), int(n)))
    return shapes


def make_block(shapes: list[tuple[int, int]], dtype: torch.dtype, seed: int) -> list[Linear]:
    from quantkit.qmath import quantize_weight_per_channel

    gen = torch.Generator(device="cuda").manual_seed(seed)
    block = []
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
        q, s = quantize_weight_per_channel(w.float())
        block.append(Linear(w, q, s))
    return block


def make_inputs(block: list[Linear], rows: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed + rows)
    xs = []
    for lin in block:
        k = lin.weight.shape[1]
        x = torch.randn(rows, k, device="cuda", generator=gen)
        x[:, torch.randperm(k, device="cuda", generator=gen)[: k // 64]] *= 8
        xs.append(x.to(dtype))
    return xs


def build_methods(with_reference: bool) -> dict[str, tuple[str, Method]]:
    """name -> (dispatch op, fn). The op is what ``quantkit.kernels.select`` is asked about."""
    from quantkit import kernels
    from quantkit.kernels import reference
    from quantkit.kernels import triton_kernels as tk

    def int_mm(lin: Linear, x: torch.Tensor) -> torch.Tensor:
        with kernels.force_backend("cuda_int_mm"):
            backend, fn = kernels.select("w8a8", x, lin.q)
        assert backend == "cuda_int_mm", backend  # callers check availability first
        return fn(x, lin.q, lin.scale)

    methods: dict[str, tuple[str, Method]] = {
        BASELINE: ("", lambda lin, x: F.linear(x, lin.weight)),
        "w8a16_triton": ("w8a16", lambda lin, x: tk.w8a16_linear(x, lin.q, lin.scale)),
        "w8a8_triton": ("w8a8", lambda lin, x: tk.w8a8_linear(x, lin.q, lin.scale)),
        "w8a8_triton_2pass": ("w8a8", lambda lin, x: tk.w8a8_linear(x, lin.q, lin.scale, prequantize=True)),
        "w8a8_int_mm": ("w8a8", int_mm),
    }
    if with_reference:
        methods["w8a16_reference"] = ("w8a16", lambda lin, x: reference.w8a16_linear(x, lin.q, lin.scale))
        methods["w8a8_reference"] = ("w8a8", lambda lin, x: reference.w8a8_linear(x, lin.q, lin.scale))
    return methods


def int_mm_available(block: list[Linear], xs: list[torch.Tensor]) -> bool:
    from quantkit import kernels

    with kernels.force_backend("cuda_int_mm"):
        return all(kernels.select("w8a8", x, lin.q)[0] == "cuda_int_mm" for lin, x in zip(block, xs, strict=True))


def time_us(fn: Callable[[], object], use_graphs: bool, rep_ms: int) -> tuple[float, str]:
    """Median time of ``fn`` in microseconds, and how it was measured."""
    import triton.testing

    if use_graphs:
        try:
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"), "cuda_graph"
        except RuntimeError as err:  # e.g. an op that cannot be captured: say so, time it without
            log.warning("CUDA graph capture failed (%s); timing plain launches instead", err)
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"), "cuda_events"


def run(args: argparse.Namespace) -> dict:
    import triton

    from quantkit.kernels import triton_kernels as tk
    from quantkit.qmath import sqnr_db

    torch.backends.cuda.matmul.allow_tf32 = False  # the float product is the accuracy reference
    dtype = DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes)
    row_counts = [int(m) for m in args.m.split(",")]
    block = make_block(shapes, dtype, args.seed)
    methods = build_methods(args.reference)
    device = torch.device("cuda")

    results = []
    for rows in row_counts:
        xs = make_inputs(block, rows, dtype, args.seed)
        y_float = torch.cat([(x.float() @ lin.weight.float().T).flatten() for lin, x in zip(block, xs, strict=True)])
        split_k = [tk.pick_split_k(rows, lin.q.shape[0], lin.q.shape[1], device) for lin in block]
        log.info("M=%d: split-K per linear %s", rows, split_k)
        for name, (_, method) in methods.items():
            if name == "w8a8_int_mm" and not int_mm_available(block, xs):
                log.info("M=%d: %s skipped (torch._int_mm needs M > 16 and K, N multiples of 8)", rows, name)
                continue

            def call_block(method: Method = method, xs: list[torch.Tensor] = xs) -> list[torch.Tensor]:
                return [method(lin, x) for lin, x in zip(block, xs, strict=True)]

            # The first call autotunes the Triton kernels; it must happen before any graph capture.
            outputs = call_block()
            torch.cuda.synchronize()
            sqnr = sqnr_db(y_float, torch.cat([y.float().flatten() for y in outputs]))
            del outputs
            us, timing = time_us(call_block, not args.no_cuda_graphs, args.rep_ms)
            results.append({"m": rows, "method": name, "us": us, "sqnr_db": sqnr, "timing": timing})
            log.info("M=%d %-20s %9.1f us  SQNR %.1f dB  (%s)", rows, name, us, sqnr, timing)
        torch.cuda.empty_cache()

    baseline = {r["m"]: r["us"] for r in results if r["method"] == BASELINE}
    for r in results:
        r["speedup_vs_bf16"] = baseline[r["m"]] / r["us"]
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": shlex.join([sys.executable, *sys.argv]),
        "dtype": args.dtype,
        "shapes_kxn": shapes,
        "unit": "microseconds per block call (median); speedup = t_bf16 / t_method",
        "results": results,
        "autotune": tk.autotune_choices(),
    }


def format_table(report: dict) -> str:
    """One row per M, one column per method: ``time us (speedup x) / SQNR dB``."""
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    by_key = {(r["m"], r["method"]): r for r in report["results"]}
    row_counts = list(dict.fromkeys(r["m"] for r in report["results"]))
    header = ["M", *methods]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for rows in row_counts:
        cells = [str(rows)]
        for name in methods:
            r = by_key.get((rows, name))
            cells.append(
                "n/a" if r is None else f"{r['us']:.1f} us ({r['speedup_vs_bf16']:.2f}x) {r['sqnr_db']:.1f} dB"
            )
        lines.append(" | ".join(cells))
    title = f"{report['device']}, {report['dtype']}, block {report['shapes_kxn']} (KxN): time per block call"
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA GPU is required (no CPU timings are produced)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("bench_kernels: triton is required (pip install triton)", file=sys.stderr)
        return 2
    report = run(args)
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
