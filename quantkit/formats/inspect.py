"""``quantkit inspect DIR``: what a checkpoint is, from its metadata alone.

Reads ``config.json`` and the safetensors *headers* (names, dtypes, shapes; no tensor data) of its one
``model.safetensors`` or its Hugging Face shards, and builds the model skeleton on the meta device
(no weights) to know every linear layer. Reports the
scheme, which layers are quantized and which are left in float, the bytes by kind, the tool and
format version, and whether the tensors on disk are exactly those the config promises.

Both layouts quantkit writes are understood: its own (``quant_method: "quantkit"``) and the
compressed-tensors export (``quant_method: "compressed-tensors"``), told apart by that field.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.modules import SCALE_BUFFERS, is_float_linear, weight_out_in
from ..core.record import QuantRecord
from ..errors import QuantkitError
from .compressed_tensors import PROVENANCE_NAME, vllm_shape_violations
from .native import checkpoint_problems
from .safetensors_io import CheckpointReader

_DTYPE_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}


@dataclass
class TensorInfo:
    dtype: str  # safetensors dtype name: I8, F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class CheckpointInfo:
    path: str
    format: str  # "quantkit" or "compressed-tensors"
    scheme: str  # human description
    model_type: str
    dtype: str
    tool: str
    quantized: list[str]
    skipped: list[str]
    bytes: dict[str, int]
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "consistent": self.consistent}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> dtype and shape of every tensor in the folder's ``model.safetensors`` or shards (headers only)."""
    with CheckpointReader(path) as reader:
        return {k: TensorInfo(reader.info(k).dtype_name, reader.info(k).shape) for k in reader.keys()}


def _skeleton_linears(config_dict: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    """``{name: (out, in)}`` of every float linear layer of the architecture, or None if unknown."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    try:
        config = AutoConfig.for_model(**d)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None
    return {n: tuple(weight_out_in(m).shape) for n, m in model.named_modules() if _is_linear(m)}


def _is_linear(m: nn.Module) -> bool:
    return is_float_linear(m) or isinstance(m, nn.Linear)


def inspect(path: str | Path) -> CheckpointInfo:
    """Describe the checkpoint folder ``path`` without loading its weights."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QuantkitError(f"{path} has no config.json; is it a model folder?")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise QuantkitError(f"{cfg_file} is not valid JSON") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise QuantkitError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    tensors = read_header(path)
    linears = _skeleton_linears(config)
    method = qc.get("quant_method")
    if method == "quantkit":
        info = _inspect_quantkit(path, config, qc, tensors, linears)
        if linears is not None:  # what quantkit.load would refuse, unless said above already
            named = " ".join(info.problems)
            for problem in checkpoint_problems(path):
                tensor = problem.split()[1] if problem.startswith("tensor ") else ""
                if not tensor or tensor.rpartition(".")[0] not in named:
                    info.problems.append(problem)
    elif method == "compressed-tensors":
        info = _inspect_compressed_tensors(path, config, qc, tensors, linears)
    else:
        raise QuantkitError(f"{path} is quantized with {method!r}, which quantkit does not describe")
    if linears is None:
        info.problems.append("architecture unknown to this transformers: shapes and skipped layers not checked")
    return info


def _bytes(tensors: dict[str, TensorInfo], path: Path, is_quant, is_scale) -> dict[str, int]:
    out = Counter()
    for name, t in tensors.items():
        kind = "quantized_weights" if is_quant(name, t) else "scales" if is_scale(name, t) else "float_tensors"
        out[kind] += t.nbytes
    out["files"] = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {k: out[k] for k in ("quantized_weights", "scales", "float_tensors", "files")}


def _inspect_quantkit(path, config, qc, tensors, linears) -> CheckpointInfo:
    problems: list[str] = []
    try:
        record = QuantRecord.from_dict(qc)
    except QuantkitError as e:
        raise QuantkitError(f"{path}: {e}") from None
    qconfig = record.config
    modules = list(record.modules)
    pre_scaled = [m for m in modules if f"{m}.smooth_inv" in tensors]
    static = [m for m in modules if f"{m}.input_scale" in tensors]
    for m in modules:
        w, s = tensors.get(f"{m}.weight"), tensors.get(f"{m}.weight_scale")
        if w is None or w.dtype != "I8" or len(w.shape) != 2:
            problems.append(f"{m}: no int8 [out, in] weight")
            continue
        if linears is not None and linears.get(m) != w.shape:
            problems.append(f"{m}: weight {list(w.shape)} but the architecture has {list(linears.get(m) or [])}")
        if s is None or s.dtype != "F32" or s.shape != (w.shape[0],):
            problems.append(f"{m}: weight_scale is not fp32 [{w.shape[0]}]")
        if record.scheme_of(m) == "w8a16" and (m in pre_scaled or m in static):
            problems.append(f"{m}: W8A16 layer with activation tensors")
        if record.scheme_of(m) == "w8a8" and (m in static) != (qconfig.activations == "per_tensor"):
            problems.append(f"{m}: input_scale {'present' if m in static else 'missing'} for {qconfig.activations}")
    shaped = {m for m in modules if (t := tensors.get(f"{m}.weight")) is not None and len(t.shape) == 2}
    embeddings = [n for n in (record.input_embedding, record.output_embedding) if n]
    for m in embeddings:
        if m == record.output_embedding and record.tied_embeddings:
            if f"{m}.weight" in tensors or f"{m}.weight_scale" in tensors:
                problems.append(f"{m}: tied to {record.input_embedding} but has a table of its own on disk")
            continue  # shares the input embedding's table, written once under its name
        w, s = tensors.get(f"{m}.weight"), tensors.get(f"{m}.weight_scale")
        if w is None or w.dtype != "I8" or len(w.shape) != 2:
            problems.append(f"{m}: no int8 [rows, dim] table")
        elif s is None or s.dtype != "F32" or s.shape != (w.shape[0],):
            problems.append(f"{m}: weight_scale is not fp32 [{w.shape[0]}]")
        elif linears is not None and m in linears and linears[m] != w.shape:
            problems.append(f"{m}: table {list(w.shape)} but the architecture has {list(linears[m])}")
    listed = set(modules) | set(embeddings)
    stray = sorted(
        k.rpartition(".")[0] for k, t in tensors.items() if t.dtype == "I8" and k.rpartition(".")[0] not in listed
    )
    if stray:
        problems.append(f"int8 tensors for layers the config does not list: {stray[:3]}")
    skipped = [n for n in (linears or {}) if n not in listed]
    if linears is not None:
        problems += [f"{m}: not a linear layer of this architecture" for m in modules if m not in linears]
    if not embeddings:
        embedding_note = "float"
    else:
        embedding_note = "int8 (per-row scales): " + " + ".join(embeddings)
        if record.tied_embeddings:
            embedding_note += ", one shared table"
        if record.output_embedding:
            embedding_note += f"; {record.output_embedding} runs weight-only"
    quant_suffixes = tuple(f".{b}" for b in SCALE_BUFFERS)
    return CheckpointInfo(
        path=str(path),
        format=f"quantkit (format version {qc.get('format_version')})",
        scheme=record.label,
        model_type=config.get("model_type", "?"),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "?"),
        tool=f"quantkit {record.tool_version}",
        quantized=modules,
        skipped=skipped,
        bytes=_bytes(
            tensors,
            path,
            lambda n, t: t.dtype == "I8",
            lambda n, t: n.endswith(quant_suffixes) and n.rpartition(".")[0] in listed,
        ),
        problems=problems,
        details={
            "embeddings": embedding_note,
            "run_time_pre_scales": len(pre_scaled),
            "static_input_scales": len(static),
            "exclude": list(qconfig.exclude),
            "include": list(qconfig.include),
            "vllm_kernels": [
                f"{note} (after export with --format compressed-tensors)"
                for note in vllm_kernel_notes(
                    *(
                        {
                            m: tensors[f"{m}.weight"].shape
                            for m in modules
                            if m in shaped and record.scheme_of(m) == scheme
                        }
                        for scheme in ("w8a16", "w8a8")
                    )
                )
            ],
        },
    )


_CT_PARAMS = {
    "int-quantized": {"weight": "I8", "weight_scale": None},
    "pack-quantized": {"weight_packed": "I32", "weight_scale": None, "weight_shape": "I64"},
}


def _ct_layer_formats(groups: dict[str, Any], found: list[str]) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """Each quantized layer's group format, the activation settings per format, and problems.

    A group targets the class ``Linear`` (every quantized layer) or names its layers (the
    ``mixed-precision`` export of ``--max-drift``)."""
    formats: dict[str, str] = {}
    acts: dict[str, Any] = {}
    problems: list[str] = []
    for gname, g in groups.items():
        fmt = g.get("format")
        if fmt not in _CT_PARAMS:
            problems.append(
                f"{gname}: format {fmt!r}; only quantkit's exports (int-quantized, pack-quantized) are checked"
            )
            continue
        acts[fmt] = g.get("input_activations")
        targets = g.get("targets") or []
        for m in found if targets == ["Linear"] else targets:
            formats.setdefault(m, fmt)
    return formats, acts, problems


def _inspect_compressed_tensors(path, config, qc, tensors, linears) -> CheckpointInfo:
    groups = qc.get("config_groups") or {}
    found = {
        k.rpartition(".")[0]
        for k in tensors
        if k.endswith((".weight", ".weight_packed")) and f"{k.rpartition('.')[0]}.weight_scale" in tensors
    }
    order = {n: i for i, n in enumerate(linears or {})}  # model order where the architecture is known
    quantized = sorted(found, key=lambda n: (order.get(n, len(order)), n))
    formats, acts_of, problems = _ct_layer_formats(groups, quantized)
    if not groups:
        problems.append("quantization_config has no config_groups")
    schemes = []
    for fmt in dict.fromkeys(formats.values()):
        acts = acts_of[fmt]
        if acts is None:
            schemes.append("W8A16: int8 per-channel weights, float activations")
        else:
            how = "dynamic per-token" if acts.get("dynamic") else f"static per-{acts.get('strategy')}"
            schemes.append(f"W8A8: int8 per-channel weights, {how} int8 activations")
    scheme = "; ".join(schemes) or "none"
    if len(schemes) > 1:
        counts = Counter(formats.values())
        scheme = f"mixed: {schemes[0]} ({counts['int-quantized']} layers); {schemes[1]} ({counts['pack-quantized']})"
    ignore = set(qc.get("ignore") or [])
    for m in quantized:
        fmt = formats.get(m)
        if fmt is None:
            problems.append(f"{m}: quantized tensors on disk but no config group covers it")
            continue
        for p, dt in _CT_PARAMS[fmt].items():
            t = tensors.get(f"{m}.{p}")
            if t is None or (dt is not None and t.dtype != dt):
                problems.append(f"{m}: missing or wrong {p}")
        s = tensors.get(f"{m}.weight_scale")
        out_in = (linears or {}).get(m)
        if out_in and s is not None and s.shape != (out_in[0], 1):
            problems.append(f"{m}: weight_scale {list(s.shape)}, expected [{out_in[0]}, 1]")
        if out_in and fmt == "pack-quantized":
            packed = tensors.get(f"{m}.weight_packed")
            if packed is not None and packed.shape != (out_in[0], -(-out_in[1] // 4)):
                problems.append(f"{m}: weight_packed {list(packed.shape)} does not hold {list(out_in)} int8 values")
        if out_in and fmt == "int-quantized":
            w = tensors.get(f"{m}.weight")
            if w is not None and w.shape != out_in:
                problems.append(f"{m}: weight {list(w.shape)} but the architecture has {list(out_in)}")
        acts = acts_of.get(fmt)
        if acts is not None and not acts.get("dynamic") and f"{m}.input_scale" not in tensors:
            problems.append(f"{m}: static activations but no input_scale")
    problems += [f"{m}: named by a config group but not on disk" for m in formats if m not in found]
    skipped = sorted(ignore)
    if linears is not None:
        unaccounted = [n for n in linears if n not in ignore and n not in found]
        if unaccounted:
            problems.append(f"linear layers neither quantized nor ignored: {unaccounted[:3]}")
    provenance = path / PROVENANCE_NAME
    tool = f"compressed-tensors {qc.get('version', '?')}"
    if provenance.is_file():
        made_by = json.loads(provenance.read_text()).get("quantkit_config", {}).get("tool_version", "?")
        tool = f"quantkit {made_by} ({tool})"
    shapes = {m: _ct_shape(m, formats.get(m), tensors, linears) for m in quantized}
    vllm = vllm_kernel_notes(
        {m: sh for m, sh in shapes.items() if sh and formats.get(m) == "pack-quantized"},
        {m: sh for m, sh in shapes.items() if sh and formats.get(m) == "int-quantized"},
    )
    return CheckpointInfo(
        path=str(path),
        format=f"compressed-tensors ({qc.get('format')})",
        scheme=scheme,
        model_type=config.get("model_type", "?"),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "?"),
        tool=tool,
        quantized=quantized,
        skipped=skipped,
        bytes=_bytes(
            tensors,
            path,
            lambda n, t: n.rpartition(".")[0] in found and n.rpartition(".")[2] in ("weight", "weight_packed"),
            lambda n, t: n.rpartition(".")[0] in found and n.rpartition(".")[2] in ("weight_scale", "input_scale"),
        ),
        problems=problems,
        details={"vllm_kernels": vllm},
    )


def _ct_shape(m: str, fmt: str | None, tensors: dict[str, TensorInfo], linears) -> tuple[int, int] | None:
    """A quantized layer's ``(out, in)``: from the architecture, else from its tensors."""
    if linears is not None and m in linears:
        return linears[m]
    if fmt == "int-quantized" and f"{m}.weight" in tensors:
        return tensors[f"{m}.weight"].shape
    return None  # a packed layer's shape is in its weight_shape tensor's data, which inspect does not read


def vllm_kernel_notes(w8a16: dict[str, tuple[int, int]], w8a8: dict[str, tuple[int, int]]) -> list[str]:
    """One line per kernel: whether vLLM's INT8 kernels take every layer's shape, and which they do not."""
    bad = vllm_shape_violations(w8a16, w8a8)

    def fit(kernel: str, of: dict) -> str:
        if kernel not in bad:
            return f"all {len(of)} layers fit"
        return f"{len(bad[kernel])} of {len(of)} layers do not fit, e.g. {', '.join(bad[kernel][:3])}"

    notes = []
    if w8a16:
        notes.append(f"W8A16 on Marlin (in % 128, out % 64): {fit('Marlin', w8a16)}")
        notes.append(f"W8A16 on Machete, Hopper (out % 128): {fit('Machete', w8a16)}")
    if w8a8:
        notes.append(f"W8A8 on CUTLASS (in, out % 16): {fit('CUTLASS scaled_mm (W8A8)', w8a8)}")
    return notes


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _by_kind(names: list[str]) -> str:
    """``q_proj x30, k_proj x30, ...`` in first-seen order."""
    counts = Counter(n.rpartition(".")[2] for n in names)
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


_DETAIL_LABELS = {
    "run_time_pre_scales": "pre-scaled",  # layers with a run-time SmoothQuant pre-scale (smooth_inv)
    "static_input_scales": "static act",  # layers with a static per-tensor activation scale
}


def _layers(n: int) -> str:
    return f"{n} linear layer{'' if n == 1 else 's'}"


def format_text(info: CheckpointInfo) -> str:
    b = info.bytes
    lines = [
        f"{info.path}",
        f"  format      {info.format}, written by {info.tool}",
        f"  scheme      {info.scheme}",
        f"  model       {info.model_type}, float dtype {info.dtype}",
        f"  quantized   {_layers(len(info.quantized))} ({_by_kind(info.quantized)})",
        f"  skipped     {_layers(len(info.skipped))}{': ' + ', '.join(info.skipped[:8]) if info.skipped else ''}"
        f"{' ...' if len(info.skipped) > 8 else ''}",
        f"  bytes       {_mib(b['files'])} on disk: quantized weights {_mib(b['quantized_weights'])}, "
        f"scales {_mib(b['scales'])}, float tensors {_mib(b['float_tensors'])}",
    ]
    for k, v in info.details.items():
        if v not in ([], 0):
            if k == "vllm_kernels":  # one line each
                lines += [f"  {'vLLM' if i == 0 else '':<11} {note}" for i, note in enumerate(v)]
                continue
            lines.append(f"  {_DETAIL_LABELS.get(k, k):<11} {', '.join(v) if isinstance(v, list) else v}")
    if info.consistent:
        lines.append("  consistent  yes: every tensor the config promises is on disk with the right dtype and shape")
    else:
        lines.append(f"  consistent  NO ({len(info.problems)} problems)")
        lines += [f"    - {p}" for p in info.problems[:20]]
    return "\n".join(lines)
