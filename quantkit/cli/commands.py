"""What each ``quantkit`` command does, given its parsed arguments."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import CLI_DEFAULT_ALPHA, DEFAULT_ALPHA, QuantConfig
from ..errors import QuantkitError

log = logging.getLogger("quantkit")


def _cmd_run(args, progress: bool) -> None:
    from ..evaluation.default_job import run_default_job

    run_default_job(
        args.model,
        args.out,
        overwrite=args.overwrite,
        n_windows=args.windows,
        text=args.text,
        scheme=args.scheme,
        alpha=args.alpha,
        calibration=args.calibration,
        n_samples=args.samples,
        seq_len=args.seq_len,
        measure_speed=not args.no_speed,
        device=args.device,
        progress=progress,
    )
    print((args.out / "report.md").read_text())
    log.info("wrote %s (checkpoints, results.json, report.md, report.html)", args.out)


def _cmd_quantize(args, progress: bool) -> None:
    from ..evaluation.pipeline import quantize_to_disk

    alpha = args.alpha
    if alpha is None:
        alpha = CLI_DEFAULT_ALPHA if args.stats is None else DEFAULT_ALPHA
        if args.stats is not None and args.scheme == "w8a8" and not args.no_smooth:
            log.info("alpha %s: saved statistics cannot be searched for alpha (give --alpha to choose)", alpha)
    config = QuantConfig(
        scheme=args.scheme,
        activations=args.activations,
        smoothing="none" if args.no_smooth else "smoothquant",
        alpha=alpha,
        fallback_smoothing=not args.no_fallback_smoothing,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        embeddings=args.embeddings,
        max_drift=args.max_drift,
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
        device=args.device,
        progress=progress,
    )
    if args.format == "compressed-tensors":
        log.info("wrote %s (%s, compressed-tensors; serve with: vllm serve %s)", args.out, config.label, args.out)
    else:
        log.info("wrote %s (%s)", args.out, config.label)


def _cmd_calibrate(args, progress: bool) -> None:
    from ..core.calibration import save_stats
    from ..devices import resolve_device
    from ..evaluation.pipeline import calibrate_layerwise
    from ..formats.output_dir import atomic_file, check_destination

    resolve_device(args.device)  # a bad --device fails before any work
    if args.out.exists():
        raise QuantkitError(f"{args.out} already exists; choose another path")
    check_destination(args.out)
    path, stats, fingerprint = calibrate_layerwise(
        args.model,
        calibration=args.calibration,
        n_samples=args.samples,
        seq_len=args.seq_len,
        device=args.device,
        progress=progress,
    )
    metadata = {"model": str(path), "fingerprint": fingerprint}
    metadata.update(samples=str(args.samples), seq_len=str(args.seq_len))
    with atomic_file(args.out) as tmp:
        try:
            save_stats(stats, tmp, metadata)
        except (QuantkitError, OSError):
            raise
        except Exception as e:  # safetensors' own errors
            raise QuantkitError(f"cannot write {args.out}: {str(e).strip().splitlines()[0]}") from None
    log.info("wrote statistics for %d layers to %s", len(stats), args.out)


def _cmd_eval(args, progress: bool) -> None:
    from ..devices import resolve_device
    from ..evaluation.layer_error import attach_layer_errors
    from ..evaluation.pipeline import evaluate_all
    from ..formats.output_dir import check_destination, write_text_atomic

    resolve_device(args.device)  # a bad --device fails before any work
    for c in args.checkpoints:
        if not c.is_dir():
            raise QuantkitError(f"checkpoint {c} not found")
    checkpoints = {c.name: c for c in args.checkpoints}
    if len(checkpoints) != len(args.checkpoints):
        raise QuantkitError("two checkpoints have the same folder name; their results would be confused")
    if args.out.is_dir():
        raise QuantkitError(f"--out {args.out} is a folder; give a .json file name")
    target = args.out.resolve()
    for c in args.checkpoints:
        if c.resolve() in target.parents:
            raise QuantkitError(f"--out {args.out} is inside checkpoint {c}; write the results elsewhere")
    baseline = Path(args.baseline)
    if baseline.is_dir() and baseline.resolve() in target.parents:
        raise QuantkitError(f"--out {args.out} is inside the baseline model {baseline}; write the results elsewhere")
    if args.text is not None and args.text.resolve() == target:
        raise QuantkitError(f"--out {args.out} is the evaluation text; write the results elsewhere")
    check_destination(args.out)
    results = evaluate_all(
        args.baseline,
        checkpoints,
        text=args.text,
        n_windows=args.windows,
        window=args.window,
        measure_speed=not args.no_speed,
        check_baseline=not args.force,
        device=args.device,
        progress=progress,
    )
    attach_layer_errors(results, args.baseline, checkpoints, text=args.text, device=args.device, progress=progress)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    log.info("wrote %s", args.out)


def _cmd_report(args, progress: bool) -> None:
    from ..evaluation.report_html import write_html
    from ..evaluation.report_md import read_results, write_markdown

    html = args.html or args.out.with_suffix(".html")
    inputs = {p.resolve() for p in args.results}
    for out in (args.out, html):
        if out.resolve() in inputs:
            raise QuantkitError(f"{out} is one of the results files; the report would overwrite it")
    results = read_results(args.results)
    write_markdown(results, args.out)
    write_html(results, html, titles=[str(p) for p in args.results])
    log.info("wrote %s and %s", args.out, html)


def _cmd_inspect(args, progress: bool) -> int:
    from ..formats.inspect import format_text, inspect

    if not args.checkpoint.is_dir():
        raise QuantkitError(f"checkpoint {args.checkpoint} not found")
    info = inspect(args.checkpoint)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_text(info))
    return 0 if info.consistent else 1


def _cmd_lm_eval(args, progress: bool) -> int:
    from ..evaluation.harness import run_lm_eval

    return run_lm_eval(args.lm_eval_args)


def _cmd_estimate(args, progress: bool) -> None:
    from ..evaluation.estimate import estimate, format_text

    result = estimate(
        args.model,
        context=args.context,
        batch=args.batch,
        bandwidth_gb_s=args.bandwidth,
        kv_dtype=args.kv_dtype,
        embeddings=args.embeddings,
        progress=progress,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_text(result))


COMMANDS = {
    "run": _cmd_run,
    "quantize": _cmd_quantize,
    "calibrate": _cmd_calibrate,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "inspect": _cmd_inspect,
    "estimate": _cmd_estimate,
    "lm-eval": _cmd_lm_eval,
}
