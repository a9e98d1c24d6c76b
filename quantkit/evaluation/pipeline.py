"""Jobs the CLI runs: quantize one checkpoint layer by layer, and evaluate checkpoints against their
float baseline (the whole loop on one model is :mod:`.default_job`).

Speed for one results file is measured in one process, so speed ratios compare runs on the same
machine under the same load. Peak memory is the exception: each model is measured in a fresh
process of its own (see :func:`quantkit.evaluation.measure.peak_memory`), so one model's allocations never
count against another's.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import (
    DEFAULT_EVAL_WINDOW,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    FORMATS,
    QuantConfig,
)
from ..core.calibration import DEFAULT_CALIBRATION, ActStats, make_samples, read_stats_for, read_texts
from ..core.probe import choose_alpha, choose_w8a16_layers
from ..core.record import QuantRecord
from ..core.sequential import Emit, collect_stats_layerwise, quantize_layerwise
from ..devices import device_name, resolve_device
from ..errors import QuantkitError
from ..formats import compressed_tensors, native, served
from ..formats.compressed_tensors import check_exportable
from ..formats.float_models import check_weights_present, load_float, load_skeleton, native_dtype, resolve
from ..formats.inspect import CheckpointInfo
from ..formats.native import load, read_record
from ..formats.output_dir import atomic_output_dir, check_destination, check_output_dir
from ..formats.safetensors_io import CheckpointReader
from ..formats.shard_writer import ShardWriter, parse_size
from ..formats.validate import raise_problems
from ..qmath import all_finite
from . import measure, speed

log = logging.getLogger(__name__)


def calibrate_layerwise(
    model: str | Path,
    config: QuantConfig | None = None,
    *,
    calibration: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, ActStats, str]:
    """``(path, stats, fingerprint)``: the activation statistics of the float model at ``model`` for the
    layers ``config`` (by default ``QuantConfig()``) quantizes, recorded in fp32 on ``calibration`` text
    one decoder layer at a time (:func:`quantkit.core.sequential.collect_stats_layerwise`), and the
    fingerprint of the model they belong to. What ``quantkit calibrate`` saves."""
    device = resolve_device(device)
    skeleton, tokenizer, path = load_skeleton(model, progress=progress)
    with CheckpointReader(path) as reader:
        check_weights_present(skeleton, reader.keys())
        fingerprint = reader.fingerprint()
        samples = make_samples(tokenizer, read_texts(calibration or DEFAULT_CALIBRATION), n_samples, seq_len)
        measure.return_large_blocks()
        stats = collect_stats_layerwise(
            skeleton, _finite(reader.get), config or QuantConfig(), samples, device=device, progress=progress
        )
    return path, stats, fingerprint


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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    propagate: str = "quantized",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Quantize a float model into a checkpoint at ``out``, one decoder layer at a time.

    The model is never loaded whole: its skeleton is built on the meta device and each layer is
    read from the checkpoint, calibrated, quantized, written and freed in turn
    (:func:`quantkit.core.sequential.quantize_layerwise`), so memory follows one layer, not the model.

    Args:
        stats: activation statistics (or a file from ``quantkit calibrate``) to use instead of calibrating.
        calibration: calibration text (``.txt``/``.jsonl``); the shipped default when None.
        dtype: dtype of the parts left float, a torch dtype name; ``"auto"``: the one the model folder declares.
        fmt: one of :data:`quantkit.config.FORMATS`.
        max_shard_size: largest file of the checkpoint (``"5GB"``, ``"500MB"``, bytes).
        propagate: ``"quantized"``: each layer is calibrated on the outputs of the quantized layers
            before it (what it will see when served); ``"float"``: on the float model's, as
            :func:`quantkit.calibrate` on the whole model does.
        device: where each layer is calibrated and quantized (``"auto"``: CUDA when present); the
            model is read from and written to disk layer by layer whatever the device.

    ``config.alpha == "auto"`` and ``config.max_drift`` are decided first, by measuring candidate
    quantizations of the whole model on the calibration text (:mod:`quantkit.core.probe`, one extra
    pass over the checkpoint each); the record holds what was asked, what was chosen and why.

    An existing ``out`` (without ``overwrite``), a bad shard size, a model that is not a float causal
    LM and one that ``fmt`` cannot hold fail before the slow work. Returns ``out``.
    """
    if fmt not in FORMATS:
        raise QuantkitError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config.auto_alpha and stats is not None:
        raise QuantkitError(
            "alpha 'auto' is chosen by quantizing at each candidate alpha on calibration text, which saved "
            "statistics do not hold: drop --stats, or give a fixed --alpha"
        )
    if config.max_drift is not None and stats is not None:
        raise QuantkitError(
            "--max-drift measures the quantized model on calibration text, which saved statistics do not hold: "
            "drop --stats"
        )
    max_shard_bytes = parse_size(max_shard_size)
    device = resolve_device(device)
    check_output_dir(out, overwrite)
    measure.return_large_blocks()  # freed layers go back to the OS (see there): before any thread allocates
    skeleton, tokenizer, path = load_skeleton(model, progress=progress)
    export = fmt == "compressed-tensors"
    if export:
        check_exportable(skeleton, config)
    with CheckpointReader(path) as reader:
        # Everything that can be checked is checked before the slow work.
        check_weights_present(skeleton, reader.keys())
        check_destination(out, source=path, needed_bytes=estimated_output_bytes(reader))
        source_fingerprint = reader.fingerprint()
        if isinstance(stats, (str, Path)):
            stats = read_stats_for(stats, path, source_fingerprint)
        samples = None
        if (config.needs_calibration or config.max_drift is not None) and stats is None:
            samples = make_samples(tokenizer, read_texts(calibration or DEFAULT_CALIBRATION), n_samples, seq_len)
            measure.release_free_heap()  # what tokenizing the whole text allocated
            log.info(
                "calibrating on %d samples x %d tokens on %s", samples.shape[0], samples.shape[1], device_name(device)
            )
        serving = native_dtype(path) if dtype == "auto" else getattr(torch, dtype)
        fmt_module = compressed_tensors if export else native
        run_config, alpha_search = config, None
        if config.auto_alpha:
            alpha_search = choose_alpha(
                copy.deepcopy(skeleton), _finite(reader.get), config, samples, device=device, progress=progress
            )
            run_config = dataclasses.replace(config, alpha=alpha_search.chosen)
            gc.collect()
            measure.release_free_heap()
        w8a16, drift_search = frozenset(), None
        if config.max_drift is not None:
            w8a16, drift_search = choose_w8a16_layers(
                copy.deepcopy(skeleton), _finite(reader.get), run_config, samples, device=device, progress=progress
            )
            gc.collect()
            measure.release_free_heap()
        with atomic_output_dir(out, overwrite) as tmp, ShardWriter(tmp, max_shard_bytes) as writer:
            quantize_layerwise(
                skeleton,
                _finite(reader.get),
                compressed_tensors.export_config(run_config) if export else run_config,
                samples=samples,
                stats=stats,
                dtype=serving,
                emit=_trimming(fmt_module.tensor_emitter(writer)),
                propagate=propagate,
                read_rows=_finite(reader.get_rows),
                w8a16=w8a16,
                device=device,
                fold_producers=export
                and config.scheme == "w8a8"
                and config.smoothing == "smoothquant"
                and config.fallback_smoothing,  # as quantize_for_export: the pre-scales it would keep
                progress=progress,
            )
            skeleton.config.quantization_config["source_fingerprint"] = source_fingerprint
            if alpha_search is not None or drift_search is not None:  # what was asked, what it chose
                record = QuantRecord.from_dict(skeleton.config.quantization_config)
                skeleton.config.quantization_config = dataclasses.replace(
                    record,
                    config=dataclasses.replace(record.config, alpha=config.alpha, max_drift=config.max_drift),
                    alpha_search=alpha_search and alpha_search.to_record(),
                    drift_search=drift_search,
                ).to_dict()
            writer.close()
            fmt_module.write_metadata(skeleton, tmp, tokenizer)
    log.info(
        "wrote %s (%s%s); peak memory of the process %.0f MiB",
        out,
        config.label,
        ", compressed-tensors" if export else "",
        measure.status_bytes("VmHWM") / 2**20 if Path("/proc/self/status").exists() else float("nan"),
    )
    return Path(out)


def estimated_output_bytes(reader: CheckpointReader) -> int:
    """About the bytes of the quantized checkpoint: matrices at one byte per value, the rest as stored."""
    total = 0
    for name in reader.keys():
        info = reader.info(name)
        total += info.nbytes // info.dtype.itemsize if len(info.shape) == 2 else info.nbytes
    return total


def _finite(read):
    """``read`` (a reader's ``get`` or ``get_rows``), refusing tensors that hold NaN or Inf: quantized,
    they would give a checkpoint that loads and serves garbage."""

    def checked(name: str, *rows: int) -> torch.Tensor:
        t = read(name, *rows)
        if t.is_floating_point() and not all_finite(t):
            raise QuantkitError(f"{name} holds NaN or Inf values in the source model; it is damaged")
        return t

    return checked


def _trimming(emit: Emit) -> Emit:
    """``emit``, then hand the heap memory freed by the previous layer back to the OS: without it
    glibc keeps freed blocks of a layer's size for reuse, and resident memory creeps up layer by layer."""

    def wrapped(prefix: str, module: nn.Module) -> None:
        emit(prefix, module)
        measure.release_free_heap()

    return wrapped


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
    device: str | torch.device = "cpu",
    check_baseline: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Results for the float baseline (one row per dtype) and each quantized checkpoint.

    Quantized models' perplexity is measured with ``ppl_dtype`` activations, like the baseline's
    row of that dtype; their speed with the first of ``speed_dtypes`` (the serving dtype).

    Before any model is loaded, every checkpoint is validated and, with ``check_baseline``, must have
    been made from ``baseline`` (the fingerprint its record holds; checkpoints without one are
    accepted with a warning): a drift against another model means nothing. A perplexity that is not
    a finite number is an error, never a figure in the results.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda:0"``, ...) runs everything there. Speed is measured
    as quantkit serves a model: static-cache decoding with each step a CUDA-graph replay on a GPU,
    a CPU-graph replay on the CPU (:func:`quantkit.evaluation.speed.speed_static`), the float
    baselines the same way.
    """
    device = resolve_device(device)
    # What loading would refuse, refused before the baseline's slow work. compressed-tensors exports
    # (what vLLM serves) are checked from their headers and loaded with transformers' own loader.
    exports = {name for name, path in checkpoints.items() if served.is_export(path)}
    records: dict[str, QuantRecord | None] = {}
    export_infos = {}
    for name, path in checkpoints.items():
        if name in exports:
            records[name], export_infos[name] = served.check_export(path)
        else:
            records[name] = read_record(path)
            raise_problems(path, native.checkpoint_problems(path))
    base_path = resolve(baseline, progress=progress)
    with CheckpointReader(base_path) as reader:
        base_fingerprint = reader.fingerprint()
    for name, record in records.items():
        if record is None:
            log.warning("%s was not exported by quantkit; cannot check that it was made from the baseline", name)
        elif not record.source_fingerprint:
            log.warning("%s does not record the model it was made from; cannot check the baseline", name)
        elif record.source_fingerprint != base_fingerprint and check_baseline:
            raise QuantkitError(
                f"checkpoint {name} was not made from the baseline {baseline} (source fingerprint "
                f"{record.source_fingerprint}, baseline {base_fingerprint}); pass the model it came from, or "
                "--force to compare anyway"
            )
    rows: list[dict[str, Any]] = []
    tokenizer = None
    batch = ids = bos = None
    for dtype_name in dict.fromkeys((ppl_dtype, *speed_dtypes)):
        model, tokenizer, base_path = load_float(baseline, dtype=getattr(torch, dtype_name), device=device)
        if batch is None:
            ids = measure.eval_token_ids(tokenizer, text)
            bos = measure.bos_id(tokenizer)
            batch = measure.windows(ids, window, n_windows, bos=bos)
        row: dict[str, Any] = {"name": f"float ({dtype_name})", "kind": "float", "dtype": dtype_name}
        row["perplexity"] = _finite_perplexity(model, batch, row["name"], progress)
        row["weight_bytes"] = measure.weight_bytes(model)
        row["checkpoint_bytes"] = measure.dir_bytes(base_path)
        if measure_speed and dtype_name in speed_dtypes:
            row["speed"] = speed.speed_static(model, ids)
            _add_peak_memory(row["speed"], base_path, "float", dtype_name, ids, device)
        rows.append(row)
        del model
        gc.collect()

    for name, path in checkpoints.items():
        record = records[name]
        row = {
            "name": name,
            "kind": "quantized",
            "dtype": ppl_dtype,
            "config": record and record.to_dict(),
            "path": str(path),
        }
        if name in exports:
            rows.append(_evaluate_export(row, path, export_infos[name], batch, ppl_dtype, device, progress))
            continue
        model = load(path, dtype=getattr(torch, ppl_dtype), device=device)
        row["perplexity"] = _finite_perplexity(model, batch, name, progress)
        if measure_speed:
            if speed_dtypes[0] != ppl_dtype:
                del model
                model = load(path, dtype=getattr(torch, speed_dtypes[0]), device=device)
            row["speed_dtype"] = speed_dtypes[0]
            row["speed"] = speed.speed_static(model, ids)
            _add_peak_memory(row["speed"], path, "quantized", speed_dtypes[0], ids, device)
        row["weight_bytes"] = measure.weight_bytes(model)
        row["checkpoint_bytes"] = measure.dir_bytes(path)
        rows.append(row)
        del model
        gc.collect()

    return {
        "schema": "quantkit.eval/1",
        "command": command_line(),
        "environment": measure.environment(),
        "protocol": {
            "text": str(Path(text or measure.DEFAULT_EVAL_TEXT).name),
            "window": window,
            "windows": int(batch.shape[0]),
            "tokens_scored": int(batch.shape[0] * (batch.shape[1] - 1)),
            "bos_token": bos,
            "perplexity_dtype": ppl_dtype,
            "speed_dtypes": list(speed_dtypes),
            "peak_memory": None
            if not measure_speed
            else measure.PEAK_MEMORY_METHOD_CUDA
            if device.type == "cuda"
            else measure.PEAK_MEMORY_METHOD,
            "device": device_name(device),
        },
        "baseline": f"float ({ppl_dtype})",
        "rows": rows,
    }


def _evaluate_export(
    row: dict[str, Any],
    path: Path,
    info: CheckpointInfo,
    batch: torch.Tensor,
    ppl_dtype: str,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """A compressed-tensors export's row: perplexity through transformers' loader, bytes from its files.

    Speed is not measured: transformers runs these checkpoints with float weights, not the int8
    kernels vLLM serves them with, so its speed would describe neither.
    """
    import importlib.metadata

    import transformers

    model = served.load_export(path, getattr(torch, ppl_dtype), device)
    w8a8 = row["config"] is None or QuantRecord.from_dict(row["config"]).config.scheme == "w8a8"
    row.update(
        format="compressed-tensors",
        loaded_by=f"transformers {transformers.__version__} + compressed-tensors "
        f"{importlib.metadata.version('compressed-tensors')}",
        note=served.TRANSFORMERS_W8A8_NOTE
        if w8a8
        else "loaded by transformers' compressed-tensors loader: weights decompressed to float (quantkit's "
        "W8A16 arithmetic exactly)",
    )
    row["perplexity"] = _finite_perplexity(model, batch, row["name"], progress)
    row["weight_bytes"] = served.export_bytes(info)
    row["checkpoint_bytes"] = measure.dir_bytes(path)
    del model
    gc.collect()
    return row


def _finite_perplexity(model: nn.Module, batch: torch.Tensor, name: str, progress: bool) -> float:
    ppl = measure.perplexity(model, batch, progress=progress, desc=f"Perplexity {name}")
    if not math.isfinite(ppl):
        raise QuantkitError(
            f"the perplexity of {name} is {ppl}: the model computes NaN or Inf on the evaluation text "
            "(damaged weights, or an overflow); nothing was written"
        )
    return ppl


def command_line() -> str:
    """The command that is running, as a user would type it (``quantkit eval ...``, not ``.../__main__.py``)."""
    argv = list(sys.argv) or ["quantkit"]
    if Path(argv[0]).name in ("quantkit", "__main__.py", "cli.py"):
        argv[0] = "quantkit"
    return " ".join(shlex.quote(a) for a in argv)


def _add_peak_memory(
    speed: dict[str, Any], path: Path, kind: str, dtype: str, ids: torch.Tensor, device: torch.device
) -> None:
    """Add ``peak_memory_bytes`` (see :func:`quantkit.evaluation.measure.peak_memory`) to a row's speed figures.

    CPU only: the figure is the process's resident memory, which does not see GPU memory.
    """
    if device.type != "cpu":  # speed_static measured the GPU's
        return
    mem = measure.peak_memory(
        path, kind=kind, dtype=dtype, prompt=ids[: measure.DECODE_PROMPT_TOKENS], decode_tokens=speed["decode_tokens"]
    )
    if mem is not None:
        speed["peak_memory_bytes"] = mem["peak_memory_bytes"]
