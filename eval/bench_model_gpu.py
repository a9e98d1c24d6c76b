"""End-to-end speed and weight memory of bf16, W8A16 and W8A8 on a Llama-3-8B-shaped model.

Speed does not depend on weight values, so the model is built from a ``LlamaConfig`` (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, rope theta 500000, untied
lm_head) with random weights, directly on the device: nothing is downloaded. Each scheme gets a
fresh model (same seed), quantized in place, measured, and freed before the next one, so only one
model is in GPU memory at a time (bf16: 16 GB).

Per scheme:

- **prefill**: one forward over ``--prefill-tokens`` random tokens (default 2048) that fills a static
  KV cache, logits for the last token only (as ``generate`` does); tokens/s = tokens / median time
  (:func:`quantkit.evaluation.speed.time_prefill`).
- **decode**: ``--decode-tokens`` greedy steps (default 128) after a ``--prompt-tokens`` prompt
  (default 128) through :class:`quantkit.evaluation.fastgen.StaticDecoder`: static KV cache, each step one CUDA
  graph replay (``--no-cuda-graphs`` for eager launches); tokens/s = steps / median time, prefill
  excluded (:func:`quantkit.evaluation.speed.time_decode`).
- **weight memory**: bytes of all parameters and buffers, and ``torch.cuda.memory_allocated()``
  after building/quantizing (before any KV cache or graph exists).

W8A16 is round-to-nearest (no calibration). W8A8 is quantkit's default SmoothQuant per-token config
(alpha 0.5, norm folding, run-time pre-scales on o_proj/down_proj); its statistics come from
:func:`quantkit.core.calibration.collect_stats` on ``--calib-samples`` x ``--calib-tokens`` random tokens
(``--w8a8-smoothing none`` for naive W8A8 without statistics). As quantkit's default config does,
the embedding and lm_head are stored int8 with per-row scales, lm_head weight-only (``--embeddings
float`` keeps both bf16); ``--quantize-lm-head`` puts lm_head in the scheme instead. While quantizing
with SmoothQuant, ``quantkit.quantize`` holds an fp32 copy of every smoothed linear weight until the
modules are swapped (4 bytes per weight: 28 GB for this model, on top of the 16 GB bf16 model),
which an 80 GB GPU holds; on smaller GPUs use ``--w8a8-smoothing none``.

``--device cpu`` with tiny overrides is a smoke test of the script (its figures are CPU numbers,
not GPU results, and no acceptance is evaluated); ``--device meta`` counts weight bytes only, exactly
and without memory, for the full-size model.

Examples::

    python eval/bench_model_gpu.py --out model_speed.json
    python eval/bench_model_gpu.py --layers 4 --out quick.json          # 4-layer 8B-shaped model
    python eval/bench_model_gpu.py --device meta                        # weight bytes only, no GPU
    python eval/bench_model_gpu.py --device cpu --layers 1 --hidden-size 64 --intermediate-size 128 \\
        --heads 4 --kv-heads 2 --vocab-size 256 --prefill-tokens 32 --prompt-tokens 8 --decode-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import platform
import shlex
import sys
import time

import torch

log = logging.getLogger("bench_model_gpu")

SCHEMES = ("bf16", "w8a16", "w8a8")
BASELINE = "bf16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Issue 3 acceptance (H100, 8B-shaped model): (scheme, metric, comparison, bar).
ACCEPTANCE = (
    ("w8a16", "decode_tok_s", ">=", 1.6),
    ("w8a8", "prefill_tok_s", ">=", 1.25),
    ("w8a16", "weight_bytes", "<=", 0.55),
    ("w8a8", "weight_bytes", "<=", 0.55),
)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows every default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples::") :].replace("::", ":"),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (cuda:N works), cpu (smoke test, tiny sizes), meta (weight bytes only)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model dtype")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {SCHEMES}")
    model = parser.add_argument_group("model shape (defaults: Llama-3-8B)")
    model.add_argument("--layers", type=int, default=32, help="decoder layers")
    model.add_argument("--hidden-size", type=int, default=4096, help="hidden size")
    model.add_argument("--intermediate-size", type=int, default=14336, help="MLP size")
    model.add_argument("--heads", type=int, default=32, help="attention heads")
    model.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    model.add_argument("--vocab-size", type=int, default=128256, help="vocabulary")
    model.add_argument("--rope-theta", type=float, default=500000.0, help="RoPE base")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--prefill-tokens", type=int, default=2048, help="prompt length of the timed prefill")
    proto.add_argument("--prompt-tokens", type=int, default=128, help="prompt before the timed decode (untimed)")
    proto.add_argument("--decode-tokens", type=int, default=128, help="timed decode steps")
    proto.add_argument("--batch-size", type=int, default=1, help="rows per prefill/decode (same prompt length)")
    proto.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median), after one warm-up run")
    proto.add_argument("--no-cuda-graphs", action="store_true", help="decode with eager launches")
    quant = parser.add_argument_group("quantization")
    quant.add_argument(
        "--w8a8-smoothing",
        choices=("smoothquant", "none"),
        default="smoothquant",
        help="smoothquant: statistics from random-token calibration; none: naive W8A8",
    )
    quant.add_argument("--calib-samples", type=int, default=4, help="W8A8 calibration: random-token samples")
    quant.add_argument("--calib-tokens", type=int, default=128, help="W8A8 calibration: tokens per sample")
    quant.add_argument(
        "--embeddings",
        choices=("int8", "float"),
        default="int8",
        help="int8 (quantkit's default): embedding and lm_head int8, lm_head weight-only; float: both bf16",
    )
    quant.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head with the scheme")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown or not schemes:
        parser.error(f"--schemes: unknown {unknown}; choose from {SCHEMES}")
    args.schemes = schemes
    # The command as run (main(argv) from a test records its own argv, not the test runner's).
    script_args = sys.argv[1:] if argv is None else argv
    args.command = shlex.join([sys.executable, sys.argv[0] if argv is None else __file__, *script_args])
    if args.prompt_tokens < 1 or args.decode_tokens < 1 or args.prefill_tokens < 1:
        parser.error("--prefill-tokens, --prompt-tokens and --decode-tokens must be positive")
    return args


def make_config(args: argparse.Namespace):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def build_model(config, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """A random-weight causal LM allocated directly on ``device`` (transformers' own init: N(0, 0.02))."""
    import transformers

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    log.info("built %s on %s in %.1f s", type(model).__name__, device, time.perf_counter() - t0)
    return model.eval()


def quantize_model(model: torch.nn.Module, scheme: str, args: argparse.Namespace) -> str:
    """Quantize in place; returns how (for the report)."""
    import quantkit
    from quantkit.core.calibration import collect_stats

    common = {"exclude": () if args.quantize_lm_head else quantkit.QuantConfig().exclude, "embeddings": args.embeddings}
    if scheme == "w8a16":
        config = quantkit.QuantConfig(scheme="w8a16", **common)
        stats, how = None, "W8A16 round-to-nearest"
    else:
        config = quantkit.QuantConfig(scheme="w8a8", smoothing=args.w8a8_smoothing, **common)
        stats, how = None, f"{config.label}"
        if config.needs_calibration:
            targets = quantkit.select_targets(model, config)
            device = next(model.parameters()).device
            if device.type == "meta":  # no values to observe: any positive statistic gives the same layout
                stats = {n: torch.ones(m.in_features, device=device) for n, m in targets.items()}
                how += ", synthetic statistics (meta device)"
            else:
                gen = torch.Generator().manual_seed(args.seed)
                samples = torch.randint(0, args.vocab_size, (args.calib_samples, args.calib_tokens), generator=gen)
                stats = collect_stats(model, samples, targets, progress=False)
                how += f", statistics from {args.calib_samples}x{args.calib_tokens} random tokens"
    t0 = time.perf_counter()
    quantkit.quantize(model, config, stats, progress=False)
    log.info("quantized (%s) in %.1f s", how, time.perf_counter() - t0)
    if args.quantize_lm_head:
        head = ", lm_head in the scheme"
    else:
        head = ", lm_head int8 weight-only" if args.embeddings == "int8" else f", lm_head {args.dtype}"
    return how + head + f", embedding {'int8' if args.embeddings == 'int8' else args.dtype}"


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_scheme(scheme: str, args: argparse.Namespace, device: torch.device) -> dict:
    from quantkit.evaluation import speed

    _free(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    # A fresh config per model: quantize() records itself in the model's config object.
    model = build_model(make_config(args), DTYPES[args.dtype], device, args.seed)
    how = f"{args.dtype} (float)" if scheme == BASELINE else quantize_model(model, scheme, args)
    _free(device)
    result: dict = {"scheme": scheme, "how": how, "weight_bytes": tensor_bytes(model)}
    if device.type == "cuda":
        result["allocated_bytes"] = torch.cuda.memory_allocated(device) - before
        torch.cuda.reset_peak_memory_stats(device)
    if device.type != "meta":
        prefill = speed.time_prefill(
            model, args.prefill_tokens, batch_size=args.batch_size, repeats=args.repeats, seed=args.seed
        )
        log.info(
            "%s prefill %d tokens: %.4f s (%.1f tok/s)", scheme, prefill.tokens, prefill.seconds, prefill.tokens_per_s
        )
        decode = speed.time_decode(
            model,
            args.decode_tokens,
            prompt_len=args.prompt_tokens,
            batch_size=args.batch_size,
            repeats=args.repeats,
            cuda_graph=False if args.no_cuda_graphs else None,
            seed=args.seed,
        )
        log.info(
            "%s decode %d tokens: %.4f s (%.1f tok/s, %s)",
            scheme,
            decode.tokens,
            decode.seconds,
            decode.tokens_per_s,
            decode.method,
        )
        result |= {
            "prefill_tok_s": prefill.tokens_per_s,
            "prefill_s": prefill.seconds,
            "prefill_samples_s": list(prefill.samples),
            "decode_tok_s": decode.tokens_per_s,
            "decode_s": decode.seconds,
            "decode_samples_s": list(decode.samples),
            "decode_timing": decode.method,
        }
        if device.type == "cuda":
            result["peak_allocated_bytes_during_timing"] = torch.cuda.max_memory_allocated(device) - before
    del model
    _free(device)
    return result


def environment(device: torch.device) -> dict:
    import transformers

    import quantkit

    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "quantkit": quantkit.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env |= {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    else:
        env["device"] = f"{platform.processor() or platform.machine()} ({device.type})"
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    return env


def add_ratios(results: dict[str, dict]) -> None:
    base = results.get(BASELINE)
    if base is None:
        return
    for r in results.values():
        ratios = {}
        for key in ("prefill_tok_s", "decode_tok_s", "weight_bytes", "allocated_bytes"):
            if key in r and key in base:
                ratios[key] = r[key] / base[key]
        r["vs_bf16"] = ratios


def acceptance(results: dict[str, dict], device: torch.device) -> list[dict]:
    """The issue's bars against the measured ratios. Only a CUDA run is judged (meta: bytes only)."""
    rows = []
    for scheme, metric, op, bar in ACCEPTANCE:
        ratio = results.get(scheme, {}).get("vs_bf16", {}).get(metric)
        judged = ratio is not None and (device.type == "cuda" or (device.type == "meta" and metric == "weight_bytes"))
        passed = None if not judged else (ratio >= bar if op == ">=" else ratio <= bar)
        rows.append({"scheme": scheme, "metric": metric, "bar": f"{op} {bar}", "ratio": ratio, "passed": passed})
    return rows


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    results = {}
    for scheme in args.schemes:
        log.info("=== %s ===", scheme)
        results[scheme] = measure_scheme(scheme, args, device)
    add_ratios(results)
    report = {
        "environment": environment(device),
        "command": args.command,
        "smoke_test_not_gpu_results": device.type != "cuda",
        "model": {
            "layers": args.layers,
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab_size": args.vocab_size,
            "rope_theta": args.rope_theta,
            "dtype": args.dtype,
            "weights": f"random (transformers init, seed {args.seed})",
        },
        "protocol": {
            "prefill_tokens": args.prefill_tokens,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "statistic": "median",
            "prefill": "one forward filling a static KV cache, last-token logits",
            "decode": "StaticDecoder greedy steps, prefill excluded, "
            + ("eager launches" if args.no_cuda_graphs else "one CUDA graph replay per step on CUDA"),
        },
        "results": results,
        "acceptance": acceptance(results, device),
    }
    if device.type == "cuda" and "triton" in sys.modules:
        from quantkit.kernels import triton_kernels

        report["autotune"] = triton_kernels.autotune_choices()
    return report


def _fmt_ratio(r: dict, key: str) -> str:
    ratio = r.get("vs_bf16", {}).get(key)
    return "" if ratio is None else f" ({ratio:.2f}x)"


def format_table(report: dict) -> str:
    env, model, proto = report["environment"], report["model"], report["protocol"]
    device_type = env["device_type"]
    lines = []
    if device_type == "cpu":
        lines.append(
            "*** CPU SMOKE RUN: these are CPU figures for a tiny model, NOT GPU results; acceptance not judged ***"
        )
    elif device_type == "meta":
        lines.append("*** META RUN: exact weight bytes only, no timing ***")
    lines.append(
        f"{env['device']}: Llama-shaped model, {model['layers']} layers, hidden {model['hidden_size']}, "
        f"intermediate {model['intermediate_size']}, heads {model['heads']}/{model['kv_heads']} KV, "
        f"vocab {model['vocab_size']}, {model['dtype']}, batch {proto['batch_size']}"
    )
    header = [
        "scheme",
        f"prefill {proto['prefill_tokens']} tok/s",
        f"decode tok/s ({proto['decode_tokens']} after {proto['prompt_tokens']})",
        "weight bytes",
        "allocated",
    ]
    lines += [" | ".join(header), " | ".join("---" for _ in header)]
    for scheme, r in report["results"].items():
        cells = [scheme]
        cells.append(f"{r['prefill_tok_s']:.1f}{_fmt_ratio(r, 'prefill_tok_s')}" if "prefill_tok_s" in r else "n/a")
        cells.append(
            f"{r['decode_tok_s']:.1f}{_fmt_ratio(r, 'decode_tok_s')} [{r['decode_timing']}]"
            if "decode_tok_s" in r
            else "n/a"
        )
        cells.append(f"{_fmt_bytes(r['weight_bytes'])}{_fmt_ratio(r, 'weight_bytes')}")
        cells.append(
            f"{_fmt_bytes(r['allocated_bytes'])}{_fmt_ratio(r, 'allocated_bytes')}" if "allocated_bytes" in r else "n/a"
        )
        lines.append(" | ".join(cells))
    lines.append("acceptance (ratio vs bf16):")
    for a in report["acceptance"]:
        verdict = {True: "PASS", False: "FAIL", None: "not judged"}[a["passed"]]
        ratio = "n/a" if a["ratio"] is None else f"{a['ratio']:.3f}"
        lines.append(f"  {a['scheme']} {a['metric']} {a['bar']}: {ratio} -> {verdict}")
    for scheme, r in report["results"].items():
        lines.append(f"  {scheme}: {r['how']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_model_gpu: no CUDA GPU here; use --device cpu (smoke test) or --device meta (bytes)", file=sys.stderr
        )
        return 2
    if device.type not in ("cuda", "cpu", "meta"):
        print(f"bench_model_gpu: unsupported device {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        log.warning("CPU smoke run: the figures are CPU numbers, not GPU results")
    report = run(args)
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
