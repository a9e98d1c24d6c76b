"""The whole job on one model (``quantkit run``, ``make demo``): write every default variant layer by
layer, evaluate them all against the float model in one run, add the per-layer error, and write
``results.json``, ``report.md`` and ``report.html``."""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CLI_DEFAULT_ALPHA, DEFAULT_EVAL_WINDOWS, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, QuantConfig
from ..core.calibration import DEFAULT_CALIBRATION, read_texts
from ..devices import resolve_device
from ..errors import QuantkitError
from ..formats.float_models import resolve
from ..formats.output_dir import atomic_output_dir, check_destination, check_output_dir
from ..formats.safetensors_io import CheckpointReader
from .measure import read_eval_text
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


def variants(scheme: str | None = None, alpha: float | str = CLI_DEFAULT_ALPHA) -> dict[str, QuantConfig]:
    """:data:`DEFAULT_VARIANTS`, of ``scheme`` only if given, with the SmoothQuant variant at ``alpha``
    (and the fixed-0.5 comparison dropped when that is the same)."""
    chosen = dict(DEFAULT_VARIANTS)
    chosen["w8a8-smoothquant"] = dataclasses.replace(chosen["w8a8-smoothquant"], alpha=alpha)
    if alpha == chosen["w8a8-smoothquant-a0.5"].alpha:
        del chosen["w8a8-smoothquant-a0.5"]
    return {n: c for n, c in chosen.items() if scheme is None or c.scheme == scheme}


def run_default_job(
    model: str,
    out: Path,
    *,
    overwrite: bool = False,
    n_windows: int = DEFAULT_EVAL_WINDOWS,
    text: str | Path | None = None,
    scheme: str | None = None,
    alpha: float | str = CLI_DEFAULT_ALPHA,
    calibration: str | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    measure_speed: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Write the default variants (:func:`variants`), evaluate them all against the float model on
    ``text`` (shipped Emma by default), write the report (all of it on ``device``). If a step after
    the checkpoints fails, they are kept in ``out`` (each is complete) and the error says so."""
    from .layer_error import attach_layer_errors
    from .report_html import write_html
    from .report_md import write_markdown

    t0 = time.time()
    device = resolve_device(device)
    check_output_dir(out, overwrite)
    if text is not None:  # a missing or unreadable text fails before the slow work
        read_eval_text(text)
    if calibration is not None:
        read_texts(calibration)
    jobs = variants(scheme, alpha)
    path = resolve(model, progress=progress)
    with CheckpointReader(path) as reader:  # room for every variant, before the first one starts
        check_destination(out, source=path, needed_bytes=len(jobs) * estimated_output_bytes(reader))
    failure = None
    with atomic_output_dir(out, overwrite) as tmp:
        checkpoints = {}
        for name, config in jobs.items():  # each calibrates itself if it needs to, layer by layer
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
        try:
            results = evaluate_all(
                path,
                checkpoints,
                text=text,
                n_windows=n_windows,
                measure_speed=measure_speed,
                device=device,
                progress=progress,
            )
            for row in results["rows"]:  # paths point at the final folder, not the temporary one
                if "path" in row:
                    row["path"] = str(out / Path(row["path"]).name)
            results["calibration"] = {
                "text": Path(calibration or DEFAULT_CALIBRATION).name,
                "samples": n_samples,
                "seq_len": seq_len,
            }
            attach_layer_errors(results, path, checkpoints, text=text, device=device, progress=progress)
            results["wall_seconds"] = round(time.time() - t0, 1)
            (tmp / "results.json").write_text(json.dumps(results, indent=2))
            write_markdown([results], tmp / "report.md")
            write_html([results], tmp / "report.html", titles=[f"{model} ({out.name})"])
        except Exception as e:  # the checkpoints are complete: keep them (an interrupt keeps nothing)
            failure = e
    if failure is not None:
        reason = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise QuantkitError(
            f"the checkpoints are written to {out}, but evaluating them failed ({reason}); "
            f"evaluate them with: quantkit eval {out}/* --baseline {model} --out results.json"
        ) from failure
    return results
