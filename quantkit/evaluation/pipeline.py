"""Jobs the CLI runs: evaluate checkpoints against their float baseline, and the whole
quantize -> evaluate -> report loop on one model.

Speed for one results file is measured in one process, so speed ratios compare runs on the same
machine under the same load. Peak memory is the exception: each model is measured in a fresh
process of its own (see :func:`quantkit.measure.peak_memory`), so one model's allocations never
count against another's.
"""

from __future__ import annotations

import gc
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..core.quantize import calibrate, quantize
from ..formats.float_models import load_float
from ..formats.native import atomic_output_dir, check_output_dir, load, read_quant_config, save
from . import measure

log = logging.getLogger(__name__)

# The variants the default job compares: weight-only, naive W8A8 and SmoothQuant W8A8 at the same
# activation granularity, so the report isolates what smoothing buys.
DEFAULT_VARIANTS: dict[str, QuantConfig] = {
    "w8a16": QuantConfig(scheme="w8a16"),
    "w8a8-naive": QuantConfig(scheme="w8a8", smoothing="none"),
    "w8a8-smoothquant": QuantConfig(scheme="w8a8"),
}


def _float_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def evaluate_all(
    baseline: str | Path,
    checkpoints: dict[str, Path],
    *,
    text: str | Path | None = None,
    n_windows: int = measure.DEFAULT_WINDOWS,
    window: int = measure.DEFAULT_WINDOW,
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
        model, tokenizer, base_path = load_float(baseline, dtype=_float_dtype(dtype_name), device=device)
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
        qconfig = read_quant_config(path)
        row = {
            "name": name,
            "kind": "quantized",
            "dtype": ppl_dtype,
            "config": qconfig.to_dict(),
            "path": str(path),
        }
        model = load(path, dtype=_float_dtype(ppl_dtype), device=device)
        row["perplexity"] = measure.perplexity(model, batch, progress=progress, desc=f"Perplexity {name}")
        if measure_speed:
            if speed_dtypes[0] != ppl_dtype:
                del model
                model = load(path, dtype=_float_dtype(speed_dtypes[0]), device=device)
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
    """Add ``peak_memory_bytes`` (see :func:`quantkit.measure.peak_memory`) to a row's speed figures.

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
    n_windows: int = measure.DEFAULT_WINDOWS,
    calibration: str | None = None,
    n_samples: int = 16,
    seq_len: int = 512,
    measure_speed: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate once, write every default variant, evaluate them all, write the report."""
    from .layer_error import attach_layer_errors
    from .report_html import write_html
    from .report_md import write_markdown

    check_output_dir(out, overwrite)
    t0 = time.time()
    with atomic_output_dir(out, overwrite) as tmp:
        float_model, tokenizer, path = load_float(model, dtype=torch.float32, progress=progress)
        stats = calibrate(float_model, tokenizer, calibration, n_samples=n_samples, seq_len=seq_len, progress=progress)
        del float_model
        checkpoints = {}
        for name, config in DEFAULT_VARIANTS.items():
            m, _, _ = load_float(path, dtype=torch.bfloat16, progress=progress)
            quantize(m, config, stats, progress=progress)
            save(m, tmp / name, tokenizer)
            checkpoints[name] = tmp / name
            del m
            gc.collect()
        results = evaluate_all(path, checkpoints, n_windows=n_windows, measure_speed=measure_speed, progress=progress)
        # Paths inside the results point at the final folder, not the temporary one.
        for row in results["rows"]:
            if "path" in row:
                row["path"] = str(out / Path(row["path"]).name)
        results["calibration"] = {
            "text": Path(calibration).name if calibration else "persuasion.txt",
            "samples": n_samples,
            "seq_len": seq_len,
        }
        attach_layer_errors(results, path, checkpoints, progress=progress)  # per-layer plot of report.html
        results["wall_seconds"] = round(time.time() - t0, 1)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        write_markdown([results], tmp / "report.md")
        write_html([results], tmp / "report.html", titles=[f"{model} ({out.name})"])
    return results
