"""Versions in one place: quantkit's own, and the transformers its loader integration needs."""

from __future__ import annotations

import importlib.metadata

__version__ = "0.1.0"

# transformers 5 has the quantizer registry and loader behaviour quantkit.formats.hf_quantizer relies on.
MIN_TRANSFORMERS_MAJOR = 5


def transformers_supported() -> bool:
    """transformers >= 5 is installed (read from its metadata, without importing it)."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return False
    major = version.split(".")[0]
    return major.isdigit() and int(major) >= MIN_TRANSFORMERS_MAJOR
