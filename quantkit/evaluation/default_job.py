"""The whole job on one model (``quantkit run``, ``make demo``): write every default variant layer by
layer, evaluate them all against the float model in one run, add the per-layer error, and write
``results.json``, ``report.md`` and ``report.html``."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CLI_DEFAULT_ALPHA, DEFAULT_EVAL_WINDOWS, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, QuantConfig
from ..core.calibration import DEFAULT_CALIBRATION
from ..devices import resolve_device
from ..formats.float_models import resolve
from ..formats.output_dir import atomic_output_dir, check_destination, check_output_dir
from ..formats.safetensors_io import CheckpointReader
from .pipeline import estimated_output_bytes, evaluate_all, quantize_to_disk

# The variants the default job compares: weight-only, naive W8A8 and SmoothQuant W8A8 at the same
# activation granularity, so the report isolates what smoothing buys; SmoothQuant both at the paper's
# fixed alpha and as quantkit does it by default (alpha chosen on the calibration text), side by side.
DEFAULT_VARIANTS: dict[str, QuantConfig] = {
    "w8a16": QuantConfig(scheme="w8a16"),
    "w8a8-naive": QuantConfig(scheme="w8a8", smoothing="none"),
    "w8a8-smoothquant-a0.5": QuantConfig(scheme="w8a8", alpha=0.5),
    "w8a8-smoothquant": QuantConfig(scheme="w8a8", alpha=CLI_DEFAULT_ALPHA),
}


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
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Write every default variant, evaluate them all against the float model, write the report
    (all of it on ``device``)."""
    from .layer_error import attach_layer_errors
    from .report_html import write_html
    from .report_md import write_markdown

    t0 = time.time()
    device = resolve_device(device)
    check_output_dir(out, overwrite)
    path = resolve(model, progress=progress)
    with CheckpointReader(path) as reader:  # room for every variant, before the first one starts
        check_destination(out, source=path, needed_bytes=len(DEFAULT_VARIANTS) * estimated_output_bytes(reader))
    with atomic_output_dir(out, overwrite) as tmp:
        checkpoints = {}
        for name, config in DEFAULT_VARIANTS.items():  # each calibrates itself if it needs to, layer by layer
            checkpoints[name] = quantize_to_disk(
                path,
                tmp / name,
                config,
                calibration=calibration,
                n_samples=n_samples,
                seq_len=seq_len,
                dtype="bfloat16",
                device=device,
                progress=progress,
            )
            gc.collect()
        results = evaluate_all(
            path, checkpoints, n_windows=n_windows, measure_speed=measure_speed, device=device, progress=progress
        )
        # Paths inside the results point at the final folder, not the temporary one.
        for row in results["rows"]:
            if "path" in row:
                row["path"] = str(out / Path(row["path"]).name)
        results["calibration"] = {
            "text": Path(calibration or DEFAULT_CALIBRATION).name,
            "samples": n_samples,
            "seq_len": seq_len,
        }
        attach_layer_errors(
            results, path, checkpoints, device=device, progress=progress
        )  # per-layer plot of report.html
        results["wall_seconds"] = round(time.time() - t0, 1)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        write_markdown([results], tmp / "report.md")
        write_html([results], tmp / "report.html", titles=[f"{model} ({out.name})"])
    return results
