"""Command line: ``quantkit {run,quantize,calibrate,eval,report,inspect} ...``.

``quantkit CMD --help`` explains each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ._version import __version__
from .config import (
    ACT_GRANULARITIES,
    DEFAULT_ALPHA,
    DEFAULT_EVAL_WINDOW,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_MODEL,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    EMBEDDINGS,
    FLOAT_DTYPES,
    FORMATS,
    SCHEMES,
    QuantConfig,
)
from .errors import QuantkitError

log = logging.getLogger("quantkit")

_EPILOG = """examples:
  quantkit run                                      # default model: quantize, evaluate, report
  quantkit quantize smollm2-135m --scheme w8a8 --out smollm2-w8a8
  quantkit quantize ./my-llama --scheme w8a16 --out my-llama-w8a16
  quantkit quantize smollm2-135m --format compressed-tensors --out smollm2-w8a8-ct   # then: vllm serve smollm2-w8a8-ct
  quantkit eval smollm2-w8a8 --baseline smollm2-135m --out w8a8.json
  quantkit report w8a8.json --out report.md                  # also writes report.html
  quantkit inspect smollm2-w8a8
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text: .txt, or .jsonl with a 'text' field per line (default: shipped Persuasion)",
    )
    g.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="number of calibration windows (default: %(default)s)"
    )
    g.add_argument(
        "--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration window (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantConfig()  # what quantize does when not told otherwise
    parser = argparse.ArgumentParser(
        prog="quantkit",
        description="INT8 post-training quantization for Hugging Face causal LMs: W8A16 (int8 weights) and "
        "SmoothQuant W8A8 (int8 weights and activations), with size/speed/perplexity reports.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="the whole job on one model: calibrate, write W8A16 / naive W8A8 / SmoothQuant W8A8, evaluate, report",
        description="Calibrate once, write the W8A16, naive W8A8 and SmoothQuant W8A8 checkpoints, evaluate them "
        "against the float model in bf16 and fp32 in one run, and write results.json and report.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local model folder or '{DEFAULT_MODEL}' (default)")
    p.add_argument(
        "--out", type=Path, default=Path("runs") / DEFAULT_MODEL, help="output folder (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--windows",
        type=int,
        default=DEFAULT_EVAL_WINDOWS,
        help=f"evaluation windows of {DEFAULT_EVAL_WINDOW} tokens (default: %(default)s)",
    )
    p.add_argument("--no-speed", action="store_true", help="skip speed measurements")
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser(
        "quantize",
        help="quantize a model and write a checkpoint",
        description="Quantize a float causal LM and write a quantized checkpoint (safetensors + config.json). "
        "The model is read, calibrated, quantized and written one decoder layer at a time, so memory follows "
        "one layer, not the model; hub ids (org/name) are taken from the Hugging Face cache.",
    )
    p.add_argument("model", help=f"local Hugging Face model folder, or '{DEFAULT_MODEL}' (the default model)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--scheme", choices=SCHEMES, default=defaults.scheme, help="default: %(default)s")
    p.add_argument(
        "--activations",
        choices=ACT_GRANULARITIES,
        default=defaults.activations,
        help="W8A8 activation scales: dynamic per-token (default) or static per-tensor from calibration",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="SmoothQuant migration strength in [0, 1] (default: %(default)s)",
    )
    p.add_argument("--no-smooth", action="store_true", help="W8A8 without SmoothQuant (naive; for comparison)")
    p.add_argument(
        "--no-fallback-smoothing",
        action="store_true",
        help="do not pre-scale activations of layers that have no norm to fold smoothing into",
    )
    p.add_argument(
        "--include", nargs="+", default=list(defaults.include), metavar="PATTERN", help="only quantize matching modules"
    )
    p.add_argument(
        "--exclude",
        nargs="+",
        default=list(defaults.exclude),
        metavar="PATTERN",
        help=f"never quantize these with the scheme (default: {' '.join(defaults.exclude)}, which --embeddings covers)",
    )
    p.add_argument(
        "--embeddings",
        choices=EMBEDDINGS,
        default=defaults.embeddings,
        help="int8: store the input embedding and lm_head as int8 with per-row scales (one shared table when "
        "tied; lm_head runs weight-only in either scheme); float: keep them in the model dtype. The "
        "compressed-tensors format always keeps them float (default: %(default)s)",
    )
    p.add_argument("--stats", type=Path, help="reuse activation statistics saved by 'quantkit calibrate'")
    p.add_argument(
        "--dtype",
        choices=[*FLOAT_DTYPES, "auto"],
        default="auto",
        help="dtype of the non-quantized parts (default: the model's own)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="quantkit",
        help="quantkit: quantkit's checkpoint (quantkit.load, or from_pretrained after 'import quantkit'); "
        "compressed-tensors: the layout vLLM serves (vllm serve DIR); SmoothQuant's run-time pre-scales are "
        "folded into the preceding layers where exact (default: quantkit)",
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest safetensors file of the checkpoint, e.g. 5GB, 500MB, 2GiB; bigger checkpoints are "
        "split into model-0000N-of-0000M.safetensors with an index, as Hugging Face does (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser(
        "calibrate",
        help="collect activation statistics and save them for reuse",
        description="Record per-input-channel activation abs-max of every linear layer on calibration text.",
    )
    p.add_argument("model", help=f"local model folder or '{DEFAULT_MODEL}'")
    p.add_argument("--out", type=Path, required=True, help="statistics file to write (.safetensors)")
    _add_calibration(p)
    _add_common(p)

    p = sub.add_parser(
        "eval",
        help="measure perplexity, size and speed of checkpoints against their float baseline",
        description="Evaluate quantized checkpoints and their float baseline in the same run; write JSON. "
        f"Perplexity: N evenly spaced non-overlapping {DEFAULT_EVAL_WINDOW}-token windows of Emma, fp32 activations.",
    )
    p.add_argument("checkpoints", nargs="+", type=Path, help="quantized checkpoint folders")
    p.add_argument("--baseline", required=True, help=f"the float model they came from (folder or '{DEFAULT_MODEL}')")
    p.add_argument("--out", type=Path, required=True, help="results JSON to write")
    p.add_argument("--text", type=Path, help="evaluation text (default: shipped Emma)")
    p.add_argument("--windows", type=int, default=DEFAULT_EVAL_WINDOWS, help="number of windows (default: %(default)s)")
    p.add_argument("--window", type=int, default=DEFAULT_EVAL_WINDOW, help="tokens per window (default: %(default)s)")
    p.add_argument("--no-speed", action="store_true", help="skip speed measurements")
    _add_common(p)

    p = sub.add_parser(
        "report",
        help="turn results JSON files into a side-by-side Markdown report and an HTML page with plots",
        description="Combine results files from 'quantkit eval' or 'quantkit run' into one Markdown report and one "
        "self-contained HTML page (comparison table, perplexity vs size, speed ratios, per-layer error).",
    )
    p.add_argument("results", nargs="+", type=Path, help="results JSON files")
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    p.add_argument("--html", type=Path, help="HTML file to write (default: --out with the suffix .html)")
    _add_common(p)

    p = sub.add_parser(
        "inspect",
        help="describe a checkpoint (scheme, layers, bytes, version, consistency) without loading it",
        description="Read a checkpoint's config.json and safetensors headers (no weights) and print what it is: "
        "scheme, layers quantized and skipped, bytes by kind, the tool version that wrote it, and whether the "
        "tensors on disk match its config. Exit status 1 if they do not.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (quantkit or compressed-tensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_common(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> bool:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()
    return not args.quiet


def _cmd_run(args, progress: bool) -> None:
    from .evaluation.pipeline import run_default_job

    run_default_job(
        args.model,
        args.out,
        overwrite=args.overwrite,
        n_windows=args.windows,
        calibration=args.calibration,
        n_samples=args.samples,
        seq_len=args.seq_len,
        measure_speed=not args.no_speed,
        progress=progress,
    )
    print((args.out / "report.md").read_text())
    log.info("wrote %s (checkpoints, results.json, report.md, report.html)", args.out)


def _cmd_quantize(args, progress: bool) -> None:
    from .evaluation.pipeline import quantize_to_disk

    config = QuantConfig(
        scheme=args.scheme,
        activations=args.activations,
        smoothing="none" if args.no_smooth else "smoothquant",
        alpha=args.alpha,
        fallback_smoothing=not args.no_fallback_smoothing,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        embeddings=args.embeddings,
    )
    quantize_to_disk(
        args.model,
        args.out,
        config,
        stats=args.stats,
        calibration=args.calibration,
        n_samples=args.samples,
        seq_len=args.seq_len,
        dtype=args.dtype,
        fmt=args.format,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        progress=progress,
    )
    if args.format == "compressed-tensors":
        log.info("wrote %s (%s, compressed-tensors; serve with: vllm serve %s)", args.out, config.label, args.out)
    else:
        log.info("wrote %s (%s)", args.out, config.label)


def _cmd_calibrate(args, progress: bool) -> None:
    from .core.calibration import save_stats
    from .evaluation.pipeline import load_calibrated

    if args.out.exists():
        raise QuantkitError(f"{args.out} already exists; choose another path")
    _, _, path, stats = load_calibrated(
        args.model, calibration=args.calibration, n_samples=args.samples, seq_len=args.seq_len, progress=progress
    )
    tmp = args.out.with_name(f".{args.out.name}.partial")
    save_stats(stats, tmp, {"model": str(path), "samples": str(args.samples), "seq_len": str(args.seq_len)})
    tmp.rename(args.out)
    log.info("wrote statistics for %d layers to %s", len(stats), args.out)


def _cmd_eval(args, progress: bool) -> None:
    from .evaluation.layer_error import attach_layer_errors
    from .evaluation.pipeline import evaluate_all

    for c in args.checkpoints:
        if not c.is_dir():
            raise QuantkitError(f"checkpoint {c} not found")
    checkpoints = {c.name: c for c in args.checkpoints}
    results = evaluate_all(
        args.baseline,
        checkpoints,
        text=args.text,
        n_windows=args.windows,
        window=args.window,
        measure_speed=not args.no_speed,
        progress=progress,
    )
    attach_layer_errors(results, args.baseline, checkpoints, text=args.text, progress=progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out)


def _cmd_report(args, progress: bool) -> None:
    from .evaluation.report_html import write_html
    from .evaluation.report_md import read_results, write_markdown

    results = read_results(args.results)
    write_markdown(results, args.out)
    html = write_html(results, args.html or args.out.with_suffix(".html"), titles=[str(p) for p in args.results])
    log.info("wrote %s and %s", args.out, html)


def _cmd_inspect(args, progress: bool) -> int:
    from .formats.inspect import format_text, inspect

    if not args.checkpoint.is_dir():
        raise QuantkitError(f"checkpoint {args.checkpoint} not found")
    info = inspect(args.checkpoint)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_text(info))
    return 0 if info.consistent else 1


_COMMANDS = {
    "run": _cmd_run,
    "quantize": _cmd_quantize,
    "calibrate": _cmd_calibrate,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "inspect": _cmd_inspect,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _setup_logging(args)
    try:
        rc = _COMMANDS[args.command](args, progress)
    except QuantkitError as e:
        print(f"quantkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantkit: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
