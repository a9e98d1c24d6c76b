"""Jobs the CLI runs: load -> calibrate -> quantize -> save one checkpoint, evaluate checkpoints
against their float baseline, and the whole quantize -> evaluate -> report loop on one model.

Speed for one results file is measured in one process, so speed ratios compare runs on the same
machine under the same load. Peak memory is the exception: each model is measured in a fresh
process of its own (see :func:`quantkit.evaluation.measure.peak_memory`), so one model's allocations never
count against another's.
"""

from __future__ import annotations

import gc
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import (
    DEFAULT_EVAL_WINDOW,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    FORMATS,
    QuantConfig,
)
from ..core.calibration import DEFAULT_CALIBRATION, ActStats, load_stats
from ..core.quantize import calibrate, quantize
from ..errors import QuantkitError
from ..formats.compressed_tensors import check_exportable, quantize_for_export, save_compressed_tensors
from ..formats.float_models import load_float, native_dtype
from ..formats.native import atomic_output_dir, check_output_dir, load, read_record, save
from . import measure

log = logging.getLogger(__name__)

# The variants the default job compares: weight-only, naive W8A8 and SmoothQuant W8A8 at the same
# activation granularity, so the report isolates what smoothing buys.
DEFAULT_VARIANTS: dict[str, QuantConfig] = {
    "w8a16": QuantConfig(scheme="w8a16"),
    "w8a8-naive": QuantConfig(scheme="w8a8", smoothing="none"),
    "w8a8-smoothquant": QuantConfig(scheme="w8a8"),
}


def load_calibrated(
    model: str | Path,
    config: QuantConfig | None = None,
    *,
    stats: str | Path | ActStats | None = None,
    calibration: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    check: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any, Path, ActStats | None]:
    """``(model, tokenizer, path, stats)``: a float model in fp32 and its activation statistics.

    The model is loaded in fp32 so that the statistics are not rounded to bf16; cast it to the
    serving dtype before quantizing. ``stats`` comes back None where ``config`` needs none, else as
    passed (a file written by ``quantkit calibrate`` is read), else recorded on ``calibration`` text
    for the layers ``config`` (by default ``QuantConfig()``) quantizes. ``check`` runs on the loaded
    model before the statistics are made, to fail before the slow part.
    """
    float_model, tokenizer, path = load_float(model, dtype=torch.float32, progress=progress)
    if check is not None:
        check(float_model)
    if config is not None and not config.needs_calibration:
        stats = None
    elif isinstance(stats, (str, Path)):
        stats = load_stats(stats)
    elif stats is None:
        stats = calibrate(
            float_model, tokenizer, calibration, config, n_samples=n_samples, seq_len=seq_len, progress=progress
        )
    return float_model, tokenizer, path, stats


def quantize_to_disk(
    model: str | Path,
    out: str | Path,
    config: QuantConfig,
    *,
    stats: str | Path | ActStats | None = None,
    calibration: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    dtype: str = "auto",
    fmt: str = "quantkit",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Load a float model, calibrate it where ``config`` needs it, quantize it and write it to ``out``.

    Args:
        stats: activation statistics (or a file from ``quantkit calibrate``) to use instead of calibrating.
        dtype: dtype of the parts left float, a torch dtype name; ``"auto"``: the one the model folder declares.
        fmt: one of :data:`FORMATS`.

    An existing ``out`` (without ``overwrite``) and a model that ``fmt`` cannot hold fail before the
    slow work. Returns ``out``.
    """
    if fmt not in FORMATS:
        raise QuantkitError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output_dir(out, overwrite)
    export = fmt == "compressed-tensors"
    m, tokenizer, path, stats = load_calibrated(
        model,
        config,
        stats=stats,
        calibration=calibration,
        n_samples=n_samples,
        seq_len=seq_len,
        check=(lambda loaded: check_exportable(loaded, config)) if export else None,  # before calibrating
        progress=progress,
    )
    m.to(native_dtype(path) if dtype == "auto" else getattr(torch, dtype))
    if export:
        quantize_for_export(m, config, stats, progress=progress)
        return save_compressed_tensors(m, out, tokenizer, overwrite=overwrite)
    quantize(m, config, stats, progress=progress)
    return save(m, out, tokenizer, overwrite=overwrite)


def evaluate_all(
    baseline: str | Path,
    checkpoints: dict[str, Path],
    *,
    text: str | Path | None = None,
    n_windows: int = DEFAULT_EVAL_WINDOWS,
    window: int = DEFAULT_EVAL_WINDOW,
    ppl_dtype: str = "float32",
    speed_dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    measure_speed: bool = True,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Results for the float baseline (one row per dtype) and each quantized checkpoint.

    Quantized models' perplexity is measured with ``ppl_dtype`` activations, like the baseline's
    row of that dtype; their speed with the first of ``speed_dtypes`` (the serving dtype).
    """
    rows: list[dict[str, Any]] = []
    tokenizer = None
    batch = ids = None
    for dtype_name in dict.fromkeys((ppl_dtype, *speed_dtypes)):
        model, tokenizer, base_path = load_float(baseline, dtype=getattr(torch, dtype_name), device=device)
        if batch is None:
            ids = measure.eval_token_ids(tokenizer, text)
            batch = measure.windows(ids, window, n_windows)
        row: dict[str, Any] = {"name": f"float ({dtype_name})", "kind": "float", "dtype": dtype_name}
        row["perplexity"] = measure.perplexity(model, batch, progress=progress, desc=f"Perplexity {row['name']}")
        row["weight_bytes"] = measure.weight_bytes(model)
        row["checkpoint_bytes"] = measure.dir_bytes(base_path)
        if measure_speed and dtype_name in speed_dtypes:
            row["speed"] = measure.speed(model, ids)
            _add_peak_memory(row["speed"], base_path, "float", dtype_name, ids, device)
        rows.append(row)
        del model
        gc.collect()

    for name, path in checkpoints.items():
        record = read_record(path)
        row = {
            "name": name,
            "kind": "quantized",
            "dtype": ppl_dtype,
            "config": record.to_dict(),
            "path": str(path),
        }
        model = load(path, dtype=getattr(torch, ppl_dtype), device=device)
        row["perplexity"] = measure.perplexity(model, batch, progress=progress, desc=f"Perplexity {name}")
        if measure_speed:
            if speed_dtypes[0] != ppl_dtype:
                del model
                model = load(path, dtype=getattr(torch, speed_dtypes[0]), device=device)
            row["speed_dtype"] = speed_dtypes[0]
            row["speed"] = measure.speed(model, ids)
            _add_peak_memory(row["speed"], path, "quantized", speed_dtypes[0], ids, device)
        row["weight_bytes"] = measure.weight_bytes(model)
        row["checkpoint_bytes"] = measure.dir_bytes(path)
        rows.append(row)
        del model
        gc.collect()

    return {
        "schema": "quantkit.eval/1",
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "environment": measure.environment(),
        "protocol": {
            "text": str(Path(text or measure.DEFAULT_EVAL_TEXT).name),
            "window": window,
            "windows": int(batch.shape[0]),
            "tokens_scored": int(batch.shape[0] * (batch.shape[1] - 1)),
            "perplexity_dtype": ppl_dtype,
            "speed_dtypes": list(speed_dtypes),
            "peak_memory": measure.PEAK_MEMORY_METHOD if measure_speed and device == "cpu" else None,
            "device": device,
        },
        "baseline": f"float ({ppl_dtype})",
        "rows": rows,
    }


def _add_peak_memory(speed: dict[str, Any], path: Path, kind: str, dtype: str, ids: torch.Tensor, device: str) -> None:
    """Add ``peak_memory_bytes`` (see :func:`quantkit.evaluation.measure.peak_memory`) to a row's speed figures.

    CPU only: the figure is the process's resident memory, which does not see GPU memory.
    """
    if device != "cpu":
        return
    mem = measure.peak_memory(
        path, kind=kind, dtype=dtype, prompt=ids[: measure.DECODE_PROMPT_TOKENS], decode_tokens=speed["decode_tokens"]
    )
    if mem is not None:
        speed["peak_memory_bytes"] = mem["peak_memory_bytes"]


def run_default_job(
    model: str,
    out: Path,
    *,
    overwrite: bool = False,
    n_windows: int = DEFAULT_EVAL_WINDOWS,
    calibration: str | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    measure_speed: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate once, write every default variant, evaluate them all, write the report."""
    from .layer_error import attach_layer_errors
    from .report_html import write_html
    from .report_md import write_markdown

    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:  # fails at once if out exists and may not be replaced
        float_model, _, path, stats = load_calibrated(
            model, calibration=calibration, n_samples=n_samples, seq_len=seq_len, progress=progress
        )
        del float_model
        checkpoints = {}
        for name, config in DEFAULT_VARIANTS.items():  # one model in memory at a time
            checkpoints[name] = quantize_to_disk(
                path, tmp / name, config, stats=stats, dtype="bfloat16", progress=progress
            )
            gc.collect()
        results = evaluate_all(path, checkpoints, n_windows=n_windows, measure_speed=measure_speed, progress=progress)
        # Paths inside the results point at the final folder, not the temporary one.
        for row in results["rows"]:
            if "path" in row:
                row["path"] = str(out / Path(row["path"]).name)
        results["calibration"] = {
            "text": Path(calibration or DEFAULT_CALIBRATION).name,
            "samples": n_samples,
            "seq_len": seq_len,
        }
        attach_layer_errors(results, path, checkpoints, progress=progress)  # per-layer plot of report.html
        results["wall_seconds"] = round(time.time() - t0, 1)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        write_markdown([results], tmp / "report.md")
        write_html([results], tmp / "report.html", titles=[f"{model} ({out.name})"])
    return results
