"""Kernel tests run on CUDA when there is a GPU, and on CPU through the Triton interpreter otherwise.

``TRITON_INTERPRET`` has to be set before any ``@triton.jit`` function is defined (the decorator
picks the interpreter or the compiler at definition time), so it is set here, before pytest
imports the test modules of this directory.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on: the GPU, or the CPU under the Triton interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
