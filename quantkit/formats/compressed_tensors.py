"""Export to the compressed-tensors layout that vLLM loads.

vLLM serves INT8 checkpoints written in the ``compressed-tensors`` format (what llm-compressor
writes): ``config.json`` carries a ``quantization_config`` with ``quant_method: "compressed-tensors"``
and each quantized ``nn.Linear`` stores

* W8A8 (``format: "int-quantized"``): ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``
  (per output channel), optional ``input_scale`` ``[1]`` for static per-tensor activations; dynamic
  per-token activation scales otherwise.
* W8A16 (``format: "pack-quantized"``): ``weight_packed`` int32 ``[out, ceil(in / 4)]`` holding four
  unsigned bytes ``q + 128`` (lane ``i`` shifted left by ``8 * i``), ``weight_scale`` ``[out, 1]`` and
  ``weight_shape`` int64 ``[2]``.

Scales are stored in the model's float dtype, as llm-compressor does (vLLM's W8A16 kernels keep them
in that dtype; its W8A8 kernels read them into fp32, which is exact). So that the checkpoint holds
*exactly* what quantkit computes, :func:`quantize_for_export` rounds each scale to that dtype and
keeps quantkit's int8 values; the quantized model in memory then computes with the rounded scales
too: it *is* the exported model. (For bf16 a scale moves by at most 2^-8 of itself, so
``round(q * scale / rounded) == q``: the int8 values are still the nearest ones to the dequantized
weights, though not always to the original float weights; requantizing from those would need the
scale dtype inside :func:`quantkit.quantize`.)

SmoothQuant's run-time pre-scale (``smooth_inv``: ``o_proj``/``down_proj`` have no norm to fold
their smoothing into) has no representation in compressed-tensors. :func:`quantize_for_export`
moves it, in float and before quantization, into the layer that produces that input, where that is
exact (:func:`quantkit.core.smoothquant.fold_pre_scales` says why), and quantizes without run-time
pre-scales. Everything else (norm-folded SmoothQuant) is already invisible at load time, so vLLM
needs nothing beyond the standard scheme.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_MAX_SHARD_SIZE, QuantConfig
from ..core import smoothquant
from ..core.calibration import ActStats
from ..core.modules import FLOAT_LINEARS, W8A8Linear, W8A16Linear, weight_out_in
from ..core.quantize import quantize, select_targets
from ..core.record import record_of
from ..core.sequential import Emit
from ..errors import QuantkitError
from .native import float_dtype, unique_state_dict
from .output_dir import atomic_output_dir
from .shard_writer import ShardWriter, parse_size

log = logging.getLogger(__name__)

CT_FORMAT = {"w8a8": "int-quantized", "w8a16": "pack-quantized"}
# Written next to config.json: how quantkit made the export (config.json's quantization_config
# block belongs to compressed-tensors, whose schema forbids extra keys in places).
PROVENANCE_NAME = "quantkit_export.json"


def check_exportable(model: nn.Module, config: QuantConfig) -> None:
    """Raise :class:`QuantkitError` if ``config`` on ``model`` cannot be written as compressed-tensors."""
    transposed = [n for n, m in select_targets(model, config).items() if FLOAT_LINEARS[type(m).__name__].transposed]
    if transposed:
        raise QuantkitError(
            f"{getattr(model.config, 'model_type', 'this model')} stores its linear layers transposed "
            f"(GPT-2 Conv1D, e.g. {transposed[0]}); compressed-tensors and vLLM expect nn.Linear [out, in] "
            "weights, so this model can only be written in quantkit's format (--format quantkit)"
        )
    warn_vllm_shapes(model, config)


# vLLM's kernels for compressed-tensors INT8 (vllm/model_executor/layers/quantization, per
# tensor-parallel shard): 8-bit channelwise weight-only layers (pack-quantized) run on Marlin, which
# needs in % 128 == 0 and out % 64 == 0 (GPTQ_MARLIN_MIN_THREAD_K / _N); Machete (Hopper) needs
# out % 128 == 0. W8A8 int-quantized layers run on CUTLASS's scaled_mm, which needs sizes % 16 == 0.
VLLM_W8A16_RULES = {"Marlin": (128, 64), "Machete": (1, 128)}  # kernel: (in multiple, out multiple)
VLLM_W8A8_MULTIPLE = 16


def vllm_shape_violations(w8a16: dict[str, tuple[int, int]], w8a8: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Per vLLM kernel, the layers (``name [out, in]``) whose shapes it cannot take (tensor parallel 1)."""
    out: dict[str, list[str]] = {}
    for kernel, (k_mult, n_mult) in VLLM_W8A16_RULES.items():
        bad = [f"{m} {list(sh)}" for m, sh in w8a16.items() if sh[1] % k_mult or sh[0] % n_mult]
        if bad:
            out[kernel] = bad
    bad = [f"{m} {list(sh)}" for m, sh in w8a8.items() if sh[0] % VLLM_W8A8_MULTIPLE or sh[1] % VLLM_W8A8_MULTIPLE]
    if bad:
        out["CUTLASS scaled_mm (W8A8)"] = bad
    return out


def warn_vllm_shapes(model: nn.Module, config: QuantConfig) -> None:
    """Log a warning naming the layers whose shapes vLLM's INT8 kernels for this scheme cannot take."""
    shapes = {n: tuple(weight_out_in(m).shape) for n, m in select_targets(model, config).items()}
    bad = vllm_shape_violations(shapes if config.scheme == "w8a16" else {}, shapes if config.scheme == "w8a8" else {})
    if "Marlin" not in bad:
        bad.pop("Machete", None)  # Hopper only, and Marlin takes what it does not
    for kernel, layers in bad.items():
        log.warning(
            "%d of %d layers do not fit vLLM's %s kernel (e.g. %s): vLLM falls back to a slower kernel for "
            "them, or refuses to load the checkpoint where no other kernel takes them; `quantkit inspect` on the "
            "export lists them",
            len(layers), len(shapes), kernel, ", ".join(layers[:3]),
        )  # fmt: skip


def export_config(config: QuantConfig) -> QuantConfig:
    """The config :func:`quantize_for_export` quantizes with: no run-time pre-scales, and float
    embeddings (vLLM's compressed-tensors loader quantizes linear layers only; ``lm_head`` is ignored)."""
    return dataclasses.replace(config, fallback_smoothing=False, embeddings="float")


def quantize_for_export(
    model: nn.Module,
    config: QuantConfig,
    stats: ActStats | None = None,
    *,
    w8a16: set[str] | frozenset[str] = frozenset(),
    progress: bool = True,
) -> nn.Module:
    """Quantize a float model in place into exactly what a compressed-tensors checkpoint can hold.

    Pre-scales are folded into producing layers (see the module docstring), the model is quantized
    with ``fallback_smoothing=False``, and every scale is rounded to the model's float dtype
    (:func:`round_scales`). Call it on the model in its serving dtype (after ``.to(bfloat16)``).

    Example:
        >>> stats = quantkit.calibrate(model, tokenizer)
        >>> quantize_for_export(model, QuantConfig(scheme="w8a8"), stats)
        >>> save_compressed_tensors(model, "smollm2-w8a8-ct", tokenizer)
    """
    check_exportable(model, config)
    if config.scheme == "w8a8" and config.smoothing == "smoothquant" and config.fallback_smoothing:
        if stats is None:
            raise QuantkitError(f"{config.label} needs calibration statistics: run quantkit.calibrate() first")
        stats, folded = smoothquant.fold_pre_scales(model, select_targets(model, config), stats, config)
        log.info("compressed-tensors export: %d run-time pre-scales folded into producing layers", len(folded))
    quantize(model, export_config(config), stats, w8a16=w8a16, progress=progress)
    round_scales(model)
    return model


@torch.no_grad()
def round_scales(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Round every quantized module's scales to ``dtype`` (the model's float dtype), keeping int8 values.

    Raises :class:`QuantkitError` if a scale would lose more than 2^-8 of its value (fp16 subnormals:
    weights below ~8e-3 in a whole channel), where the int8 values would no longer fit the scale.
    """
    dtype = dtype or float_dtype(model)
    for name, m in _quant_modules(model):
        for attr in ("weight_scale", "input_scale"):
            s = getattr(m, attr, None)
            if s is None:
                continue
            r = s.to(dtype).float()
            if not torch.all(((r - s).abs() <= s.abs() * 2**-8) & torch.isfinite(r) & (r > 0)):
                raise QuantkitError(
                    f"{name}.{attr} cannot be stored in {dtype} without changing the int8 grid; "
                    "quantize in bfloat16 or float32 (--dtype)"
                )
            setattr(m, attr, r)


def _quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized linear layers that hold their tensors (not those freed to the meta device)."""
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W8A16Linear)) and not m.weight.is_meta
    ]


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` -> int32 ``[out, ceil(in / 4)]``: lane ``i`` of a word is ``q[4k + i] + 128``
    shifted left by ``8 * i`` (compressed-tensors' ``pack_to_int32`` for 8 bits). Missing lanes are 0."""
    out, cols = q.shape
    u = q.to(torch.int64) + 128  # unsigned byte
    u = torch.nn.functional.pad(u, (0, (-cols) % 4)).view(out, -1, 4)
    word = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    # Two's complement: words with the top lane >= 128 are negative int32 values.
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


def unpack_int8(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int8`."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    lanes = torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1).view(packed.shape[0], -1)
    return (lanes[:, :cols] - 128).to(torch.int8)


def ct_quantization_config(
    qconfig: QuantConfig, ignore: list[str], w8a16: dict[str, bool] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for ``qconfig``.

    ``w8a16``: for a W8A8 checkpoint that keeps some layers W8A16 (``--max-drift``), every quantized
    layer by name, True for the W8A16 ones; they then form two config groups that name their layers,
    in the ``mixed-precision`` format."""
    weights = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "dynamic": False,
    }
    acts = None
    if qconfig.scheme == "w8a8":
        static = qconfig.activations == "per_tensor"
        acts = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "tensor" if static else "token",
            "dynamic": not static,
        }
    fmt = CT_FORMAT[qconfig.scheme]

    def group(targets: list[str], acts: dict | None, fmt: str) -> dict[str, Any]:
        return {
            "targets": targets,
            "weights": weights,
            "input_activations": acts,
            "output_activations": None,
            "format": fmt,
        }

    groups = {"group_0": group(["Linear"], acts, fmt)}
    if w8a16 and any(w8a16.values()):
        groups = {
            "group_0": group(sorted(n for n, w in w8a16.items() if not w), acts, fmt),
            "group_1": group(sorted(n for n, w in w8a16.items() if w), None, CT_FORMAT["w8a16"]),
        }
        fmt = "mixed-precision"
    block = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    try:  # informational: the compressed-tensors version this layout was checked against, if installed
        block["version"] = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        pass
    return block


def compressed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in compressed-tensors names and layouts (no copy of float tensors)."""
    dtype = float_dtype(model)
    quant = dict(_quant_modules(model))
    state = {}
    for key, t in unique_state_dict(model).items():
        module_name = key.rpartition(".")[0]
        if module_name not in quant:
            state[key] = t
    for name, m in quant.items():
        if getattr(m, "smooth_inv", None) is not None:
            raise QuantkitError(
                f"{name} has a run-time SmoothQuant pre-scale, which compressed-tensors cannot represent; "
                "quantize from the float model with --format compressed-tensors (folds it into the previous layer)"
            )
        scale = m.weight_scale.to(dtype)
        if not torch.equal(scale.float(), m.weight_scale):
            raise QuantkitError(f"{name}.weight_scale is not representable in {dtype}; call round_scales() first")
        state[f"{name}.weight_scale"] = scale[:, None].contiguous()
        if isinstance(m, W8A16Linear):
            state[f"{name}.weight_packed"] = pack_int8(m.weight)
            state[f"{name}.weight_shape"] = torch.tensor(list(m.weight.shape), dtype=torch.int64)
        else:
            state[f"{name}.weight"] = m.weight.contiguous()
            if m.input_scale is not None:
                state[f"{name}.input_scale"] = m.input_scale.to(dtype).reshape(1)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.contiguous()
    return state


def save_compressed_tensors(
    model: nn.Module,
    out: str | Path,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a model from :func:`quantize_for_export` as a compressed-tensors checkpoint vLLM can serve.

    Sharded as :func:`quantkit.save` shards (Hugging Face's layout, which vLLM reads).

    Example:
        >>> save_compressed_tensors(model, "smollm2-w8a8-ct", tokenizer)   # then: vllm serve smollm2-w8a8-ct
    """
    check_writable(model)
    max_shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out, overwrite) as tmp, ShardWriter(tmp, max_shard_bytes) as writer:
        writer.add(compressed_state_dict(model))
        writer.close()
        write_metadata(model, tmp, tokenizer)
    log.info("wrote %s (compressed-tensors %s)", out, CT_FORMAT[record_of(model).config.scheme])
    return Path(out)


def check_writable(model: nn.Module) -> None:
    """Raise :class:`QuantkitError` unless the quantized ``model`` fits the compressed-tensors layout."""
    record = record_of(model)
    if record.input_embedding or record.output_embedding:
        raise QuantkitError(
            "this model stores its embeddings/lm_head in int8, which compressed-tensors checkpoints do not hold; "
            "quantize with quantize_for_export() (or QuantConfig(embeddings='float'))"
        )
    if getattr(model.config, "model_type", "") in _TRANSPOSED_MODEL_TYPES:
        raise QuantkitError(f"{model.config.model_type} uses Conv1D layers; compressed-tensors export needs nn.Linear")


def tensor_emitter(writer: ShardWriter) -> Emit:
    """An ``emit`` for :func:`quantkit.core.sequential.quantize_layerwise` (run with :func:`export_config`):
    rounds each finished module's scales to its float dtype (:func:`round_scales`, so that the layers
    after it are calibrated on what is served) and writes its tensors in compressed-tensors layout."""

    def emit(prefix: str, module: nn.Module) -> None:
        round_scales(module)
        writer.add({prefix + k: v for k, v in compressed_state_dict(module).items()})

    return emit


def write_metadata(model: nn.Module, folder: Path, tokenizer=None) -> None:
    """Everything of the export but its tensors: ``config.json`` with compressed-tensors'
    ``quantization_config``, quantkit's provenance file, the generation config, the tokenizer."""
    check_writable(model)
    record = record_of(model)
    qconfig = record.config
    # Every remaining nn.Linear is named: compressed-tensors targets the class "Linear".
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = model.config.to_dict()
    config["dtype"] = str(float_dtype(model)).removeprefix("torch.")  # model.to() leaves config.dtype stale
    mixed = {m: record.scheme_of(m) == "w8a16" for m in record.modules} if record.w8a16_modules else None
    config["quantization_config"] = ct_quantization_config(qconfig, ignore, mixed)
    provenance = {
        "tool": "quantkit",
        "quantkit_config": record.to_dict(),
        "scale_dtype": str(float_dtype(model)).removeprefix("torch."),
        "smoothing": (
            "SmoothQuant folded into norms, and into producing layers where exact (no run-time pre-scales)"
            if qconfig.scheme == "w8a8" and qconfig.smoothing == "smoothquant"
            else "none"
        ),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


_TRANSPOSED_MODEL_TYPES = ("gpt2",)
