"""Reading compressed-tensors exports back: what ``quantkit eval`` measures of the checkpoint people serve.

An export (:mod:`quantkit.formats.compressed_tensors`) is checked from its headers
(:func:`quantkit.formats.inspect.inspect`) and loaded with transformers' own compressed-tensors
loader, which is how Python users get it; vLLM serves the same tensors with its int8 kernels.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from ..core.record import QuantRecord
from ..errors import QuantkitError
from .compressed_tensors import PROVENANCE_NAME
from .float_models import refuse_remote_code
from .inspect import CheckpointInfo, inspect

# How transformers runs an int-quantized (W8A8) export: it decompresses the weights to float and
# simulates the int8 activations in float with compressed-tensors' own rounding (per-token scale
# max|x| / 127.5, values clamped to [-128, 127]); vLLM runs int8 GEMMs with max|x| / 127, as quantkit.
TRANSFORMERS_W8A8_NOTE = (
    "loaded by transformers' compressed-tensors loader: weights decompressed to float, W8A8 activations "
    "fake-quantized in float with compressed-tensors' scale max|x|/127.5 (vLLM and quantkit use max|x|/127 "
    "and int8 GEMMs), so its perplexity is close to, not exactly, what vLLM serves"
)


def is_export(path: str | Path) -> bool:
    """Whether the folder's ``config.json`` declares compressed-tensors quantization."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def check_export(path: str | Path) -> tuple[QuantRecord | None, CheckpointInfo]:
    """Refuse, in one line, an export that transformers cannot load or whose tensors do not match its
    config (checked from the headers, before any weight is read). Returns the quantkit record it was
    made with (from ``quantkit_export.json``; None if another tool wrote it) and what inspect read."""
    path = Path(path)
    if importlib.util.find_spec("compressed_tensors") is None:
        raise QuantkitError(
            f"{path} is a compressed-tensors checkpoint; transformers loads it with the compressed-tensors "
            "package: pip install compressed-tensors"
        )
    refuse_remote_code(path)
    info = inspect(path)
    if info.problems:
        raise QuantkitError(
            f"{path} does not hold what its quantization_config promises: {info.problems[0]} "
            f"(`quantkit inspect {path}` lists every problem)"
        )
    provenance = path / PROVENANCE_NAME
    if not provenance.is_file():
        return None, info
    try:
        return QuantRecord.from_dict(json.loads(provenance.read_text())["quantkit_config"]), info
    except (ValueError, KeyError, TypeError):
        raise QuantkitError(f"{provenance} is damaged; re-export the checkpoint, or delete the file") from None


def export_bytes(info: CheckpointInfo) -> dict[str, int]:
    """Weight bytes of an export (``info`` from :func:`check_export`) as
    :func:`quantkit.evaluation.measure.weight_bytes` counts a loaded model's, from the files
    (transformers holds the weights decompressed to float)."""
    b = info.bytes
    linear = b["quantized_weights"] + b["scales"]
    return {"total": linear + b["float_tensors"], "linear": linear, "quantized_linear": linear}


def load_export(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The export as transformers serves it to Python users (``from_pretrained``), in eval mode."""
    from transformers import AutoModelForCausalLM

    from ..devices import resolve_device

    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype, trust_remote_code=False)
    return model.to(resolve_device(device)).eval()
