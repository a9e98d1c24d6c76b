"""The command line's parser: ``quantkit {run,quantize,calibrate,eval,report,inspect,estimate,lm-eval} ...``.

Option values are range-checked here, before any work; every parse error is one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._version import __version__
from ..config import (
    ACT_GRANULARITIES,
    AUTO,
    CLI_DEFAULT_ALPHA,
    DEFAULT_ALPHA,
    DEFAULT_BANDWIDTH_GB_S,
    DEFAULT_ESTIMATE_CONTEXT,
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

_EPILOG = """examples:
  quantkit run                                      # default model: quantize, evaluate, report
  quantkit quantize smollm2-135m --scheme w8a8 --out smollm2-w8a8
  quantkit quantize ./my-llama --scheme w8a16 --out my-llama-w8a16
  quantkit quantize smollm2-135m --format compressed-tensors --out smollm2-w8a8-ct   # then: vllm serve smollm2-w8a8-ct
  quantkit eval smollm2-w8a8 --baseline smollm2-135m --out w8a8.json
  quantkit report w8a8.json --out report.md                  # also writes report.html
  quantkit inspect smollm2-w8a8
  quantkit estimate ./llama-3-8b --context 8192 --batch 8    # bytes, KV cache, FLOPs, decode ceiling: config only
"""

_LM_EVAL_EPILOG = """examples:
  quantkit lm-eval --model hf --model_args pretrained=smollm2-w8a16,dtype=float32 --tasks quantkit_emma --limit 5
  quantkit lm-eval --model hf --model_args pretrained=smollm2-w8a8 --tasks hellaswag --output_path results/
  quantkit lm-eval ls tasks                         # lm_eval's task list, quantkit_emma included
requires lm_eval: pip install 'lm_eval>=0.4.10' (or pip install 'quantkit[lm-eval]')
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like quantkit's own: ``quantkit CMD: error: ...``.

    ``passthrough=NAME``: the command's arguments are another program's, so they are not parsed but
    kept, unchanged, as the list ``args.NAME`` (``-h``/``--help`` alone still shows the command's help).
    """

    def __init__(self, *args, passthrough: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._passthrough = passthrough

    def parse_known_args(self, args=None, namespace=None):
        if self._passthrough is None or args is None or list(args) in (["-h"], ["--help"]):
            return super().parse_known_args(args, namespace)
        namespace, _ = super().parse_known_args([], namespace)  # the command's defaults
        setattr(namespace, self._passthrough, list(args))
        return namespace, []

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _alpha(text: str) -> float | str:
    """``auto`` or a number in [0, 1]."""
    return AUTO if text.strip().lower() == AUTO else _unit_interval(text)


def _percent(text: str) -> float:
    """A positive percentage, e.g. ``1`` or ``0.5``."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1000:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a positive percentage, not {text}")
    return value


def _positive(text: str) -> float:
    """A positive number, e.g. a bandwidth in GB/s."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="where models run: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N "
        "(default: %(default)s)",
    )


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text: .txt, or .jsonl with a 'text' field per line (default: shipped Persuasion)",
    )
    g.add_argument(
        "--samples",
        type=_int_at_least(1),
        default=DEFAULT_SAMPLES,
        help="number of calibration windows (default: %(default)s)",
    )
    g.add_argument(
        "--seq-len",
        type=_int_at_least(2),
        default=DEFAULT_SEQ_LEN,
        help="tokens per calibration window (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantConfig()  # what quantize does when not told otherwise
    parser = _Parser(
        prog="quantkit",
        description="INT8 post-training quantization for Hugging Face causal LMs: W8A16 (int8 weights) and "
        "SmoothQuant W8A8 (int8 weights and activations), with size/speed/perplexity reports.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"quantkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "run",
        help="the whole job on one model: calibrate, write W8A16 / naive W8A8 / SmoothQuant W8A8, evaluate, report",
        description="Write the W8A16, naive W8A8 and SmoothQuant W8A8 (alpha 0.5 and alpha auto) checkpoints, "
        "evaluate them against the float model in bf16 and fp32 in one run, and write results.json, report.md "
        "and report.html.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local model folder or '{DEFAULT_MODEL}' (default)")
    p.add_argument(
        "--out", type=Path, default=Path("runs") / DEFAULT_MODEL, help="output folder (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--windows",
        type=_int_at_least(1),
        default=DEFAULT_EVAL_WINDOWS,
        help=f"evaluation windows of {DEFAULT_EVAL_WINDOW} tokens (default: %(default)s)",
    )
    p.add_argument("--no-speed", action="store_true", help="skip speed measurements")
    p.add_argument("--text", type=Path, help="evaluation text (default: shipped Emma)")
    p.add_argument("--scheme", choices=SCHEMES, help="only the variants of this scheme (default: both)")
    p.add_argument(
        "--alpha",
        type=_alpha,
        default=CLI_DEFAULT_ALPHA,
        help="alpha of the SmoothQuant variant, a number in [0, 1] or 'auto'; the alpha-0.5 variant is written "
        "beside it for comparison (default: %(default)s)",
    )
    _add_calibration(p)
    _add_device(p)
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
        type=_alpha,
        default=None,
        help="SmoothQuant migration strength in [0, 1], or 'auto': the model is quantized at each alpha of a "
        "grid (0.4-0.9) and measured whole on half the calibration samples; the alpha with the lowest "
        "calibration loss is used and recorded in the checkpoint (about 2.5x the time of a fixed alpha). "
        f"Default: {CLI_DEFAULT_ALPHA}; {DEFAULT_ALPHA} with --stats (saved statistics cannot be searched)",
    )
    p.add_argument("--no-smooth", action="store_true", help="W8A8 without SmoothQuant (naive; for comparison)")
    p.add_argument(
        "--no-fallback-smoothing",
        action="store_true",
        help="do not pre-scale activations of layers that have no norm to fold smoothing into",
    )
    p.add_argument(
        "--max-drift",
        type=_percent,
        metavar="PCT",
        help="W8A8 with a perplexity budget: keep the layers whose W8A8 outputs depart most from the float ones "
        "in W8A16 until the model's perplexity on the calibration text is within PCT %% of the float model's "
        "(measured whole, one candidate set of layers per threshold; the checkpoint records which layers took "
        "which scheme). Default: every layer in the scheme",
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
    _add_device(p)
    _add_common(p)

    p = sub.add_parser(
        "calibrate",
        help="collect activation statistics and save them for reuse",
        description="Record per-input-channel activation abs-max of every linear layer on calibration text.",
    )
    p.add_argument("model", help=f"local model folder or '{DEFAULT_MODEL}'")
    p.add_argument("--out", type=Path, required=True, help="statistics file to write (.safetensors)")
    _add_calibration(p)
    _add_device(p)
    _add_common(p)

    p = sub.add_parser(
        "eval",
        help="measure perplexity, size and speed of checkpoints against their float baseline",
        description="Evaluate quantized checkpoints and their float baseline in the same run; write JSON. "
        f"Perplexity: N evenly spaced non-overlapping {DEFAULT_EVAL_WINDOW}-token windows of Emma, fp32 activations.",
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        help="quantized checkpoint folders: quantkit's, or compressed-tensors exports (what vLLM serves; loaded "
        "with transformers' own loader, perplexity and size only)",
    )
    p.add_argument("--baseline", required=True, help=f"the float model they came from (folder or '{DEFAULT_MODEL}')")
    p.add_argument("--out", type=Path, required=True, help="results JSON to write")
    p.add_argument("--text", type=Path, help="evaluation text (default: shipped Emma)")
    p.add_argument(
        "--windows",
        type=_int_at_least(1),
        default=DEFAULT_EVAL_WINDOWS,
        help="number of windows (default: %(default)s)",
    )
    p.add_argument(
        "--window", type=_int_at_least(2), default=DEFAULT_EVAL_WINDOW, help="tokens per window (default: %(default)s)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="evaluate even if --baseline is not the model the checkpoints were made from (their drift is then "
        "meaningless)",
    )
    p.add_argument("--no-speed", action="store_true", help="skip speed measurements")
    _add_device(p)
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

    p = sub.add_parser(
        "estimate",
        help="parameters, checkpoint bytes, KV cache, decode FLOPs and speed ceiling of a model, from its config",
        description="Estimate a model from its config.json alone (built on the meta device; no weights read): "
        "parameters by kind; the checkpoint's bytes in fp32, bf16, and W8A16 and W8A8 as quantkit writes them "
        "(int8 weights with an fp32 scale per output channel, other tensors bf16); KV-cache bytes per token and at "
        "a context; decode FLOPs per token; and the bandwidth-bound decode ceiling in tokens/s (a step reads the "
        "KV cache and every weight but the embedding tables it only looks rows up in).",
    )
    p.add_argument("model", help=f"local model folder, its config.json (any file name), or '{DEFAULT_MODEL}'")
    p.add_argument(
        "--context",
        type=_int_at_least(1),
        metavar="N",
        help=f"tokens of context for the KV cache and attention (default: {DEFAULT_ESTIMATE_CONTEXT}, or the "
        "model's max_position_embeddings if smaller)",
    )
    p.add_argument(
        "--batch", type=_int_at_least(1), default=1, help="sequences decoded together (default: %(default)s)"
    )
    p.add_argument(
        "--bandwidth",
        type=_positive,
        default=DEFAULT_BANDWIDTH_GB_S,
        metavar="GB/S",
        help="memory bandwidth in GB/s (10^9 bytes) (default: %(default)g, an H100 SXM's HBM3)",
    )
    p.add_argument("--kv-dtype", choices=FLOAT_DTYPES, default="bfloat16", help="KV-cache dtype (default: %(default)s)")
    p.add_argument(
        "--embeddings",
        choices=EMBEDDINGS,
        default=defaults.embeddings,
        help="how the W8A16 and W8A8 checkpoints store the embedding and lm_head, as for quantize "
        "(default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_common(p)

    p = sub.add_parser(
        "lm-eval",
        passthrough="lm_eval_args",
        help="run lm-evaluation-harness (lm_eval) on quantkit checkpoints; every argument is lm_eval's",
        description="Run lm-evaluation-harness's command line in a process that has imported quantkit, so that its "
        "hf model loads quantkit checkpoints (from_pretrained). The arguments go to lm_eval unchanged; "
        "'quantkit lm-eval run --help' (or lm_eval --help) lists them. The tasks shipped with quantkit are added "
        "unless you pass --include_path: quantkit_emma, word perplexity on the 55 chapters of the shipped Emma, "
        "offline. The pretrained= folder and the checkpoint are checked before lm_eval starts.",
        epilog=_LM_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS", help="lm_eval's arguments")
    p.set_defaults(quiet=False, verbose=False)
    return parser
