"""One validation of a quantkit checkpoint, shared by :func:`quantkit.load`, ``from_pretrained`` and
``quantkit inspect``: a checkpoint that passes loads into exactly the model its config describes.

Given the model skeleton with quantkit's empty modules swapped in (what loading builds anyway), it
checks, from the safetensors headers alone, that every tensor the model needs is on disk with its
shape and a compatible dtype (int8 where int8 is stored, fp32 scales, a float dtype for float
tensors), that nothing else is, and that the tensors agree with the recorded scheme (static
activation scales exactly when the config says per-tensor, no activation tensors in W8A16, no
smoothing factors without SmoothQuant). Then it reads the scales (a few MB even for a 70B model):
they must be finite and positive. Float weights are checked for NaN/Inf as they are loaded
(:func:`check_finite`), since reading them all twice would double the load time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.modules import SCALE_BUFFERS, tied_output_weight
from ..core.record import QuantRecord
from ..errors import QuantkitError
from ..qmath import all_finite
from .safetensors_io import DTYPE_NAMES, TensorInfo

# The float dtypes a float tensor of a quantkit checkpoint may be stored in.
FLOAT_STORAGE = (torch.float16, torch.bfloat16, torch.float32)
# How many problems an error message names before pointing at ``quantkit inspect``.
_SHOWN = 3


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of everything a checkpoint of ``model`` stores: its state dict, each shared
    tensor once (under its first name, as :func:`quantkit.save` writes it), a tied float output
    projection not at all."""
    seen: set[int] = set()
    out = {}
    tied = tied_output_weight(model)
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None or id(t) in seen or name == tied:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def tensor_problems(model: nn.Module, record: QuantRecord, infos: Mapping[str, TensorInfo]) -> list[str]:
    """What is wrong with the tensors ``infos`` (name -> dtype, shape) for ``model``; empty if nothing."""
    problems = []
    expected = expected_tensors(model)
    quantized = set(record.quantized_modules)
    for name, t in expected.items():
        info = infos.get(name)
        if info is None:
            problems.append(f"tensor {name} is missing")
            continue
        if tuple(info.shape) != tuple(t.shape):
            problems.append(f"tensor {name} is {list(info.shape)}, the model's is {list(t.shape)}")
        owner, _, leaf = name.rpartition(".")
        exact = t.dtype == torch.int8 or (owner in quantized and leaf in SCALE_BUFFERS)
        if exact and info.dtype != t.dtype:
            problems.append(f"tensor {name} is {info.dtype_name}, it must be {_name(t.dtype)}")
        elif not exact and t.is_floating_point() and info.dtype not in FLOAT_STORAGE:
            problems.append(f"tensor {name} is {info.dtype_name}, it must be F16, BF16 or F32")
        elif not exact and not t.is_floating_point() and info.dtype != t.dtype:
            problems.append(f"tensor {name} is {info.dtype_name}, it must be {_name(t.dtype)}")
    extra = sorted(n for n in infos if n not in expected)
    if extra:
        problems.append(f"{len(extra)} tensors that the model does not have, e.g. {extra[0]}")
    config = record.config
    for m in record.modules:
        smooth, static = f"{m}.smooth_inv" in infos, f"{m}.input_scale" in infos
        if record.scheme_of(m) == "w8a16" and (smooth or static):
            problems.append(f"{m} has activation tensors (smooth_inv/input_scale) but the scheme is W8A16")
        elif record.scheme_of(m) == "w8a8" and static != (config.activations == "per_tensor"):
            has = "has" if static else "lacks"
            problems.append(f"{m} {has} an input_scale but the config says {config.activations} activations")
        if smooth and config.smoothing == "none":
            problems.append(f"{m} has a smoothing factor (smooth_inv) but the config says no smoothing")
        elif record.pre_scaled is not None and smooth != (m in record.pre_scaled):
            problems.append(f"tensor {m}.smooth_inv is {'not listed in' if smooth else 'missing from'} the record")
    return problems


def scale_problems(read: Callable[[str], torch.Tensor], record: QuantRecord, names: set[str]) -> list[str]:
    """Scales (``weight_scale``, ``smooth_inv``, ``input_scale`` of each quantized module present in
    ``names``) that are not finite and positive; ``read`` returns a tensor by name."""
    problems = []
    for m in record.quantized_modules:
        for leaf in SCALE_BUFFERS:
            name = f"{m}.{leaf}"
            if name not in names:
                continue
            t = read(name)
            if not t.is_floating_point():
                continue  # reported by tensor_problems
            t = t.float()
            if not torch.isfinite(t).all():
                problems.append(f"tensor {name} holds NaN or Inf")
            elif not (t > 0).all():
                problems.append(f"tensor {name} holds zero or negative scales")
    return problems


def raise_problems(where: str | Path, problems: list[str]) -> None:
    """One :class:`QuantkitError` naming the first problems, if there are any."""
    if not problems:
        return
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    raise QuantkitError(
        f"{where} is not a valid quantkit checkpoint: {shown}{more}; quantize it again "
        f"(quantkit inspect {where} lists what is wrong)"
    )


def check_finite(name: str, t: torch.Tensor, where: str | Path) -> None:
    """A :class:`QuantkitError` if float tensor ``name`` holds NaN or Inf."""
    if t.is_floating_point() and not all_finite(t):
        raise QuantkitError(
            f"{where} is not a valid quantkit checkpoint: tensor {name} holds NaN or Inf; quantize it again"
        )


def _name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))
