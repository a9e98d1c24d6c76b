"""Which device a command runs on: ``--device {auto,cpu,cuda,cuda:N}``.

``auto`` is the first CUDA device when PyTorch sees one, else the CPU. Asking for CUDA where there is
none, or for a CUDA device that does not exist, is one :class:`QuantkitError` before any work.
"""

from __future__ import annotations

import re

import torch

from .errors import QuantkitError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` for ``name`` (see module docstring)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if not _PATTERN.fullmatch(name):
        raise QuantkitError(f"device {name!r} is not one of {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise QuantkitError(
            f"--device {name}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu, or "
            "install a CUDA build of PyTorch on a machine with a GPU"
        )
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise QuantkitError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """What to call the device in a report: the GPU's name (e.g. ``NVIDIA H200``), or ``CPU``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"
