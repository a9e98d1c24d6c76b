"""Cheap registration of the ``"quantkit"`` quantization method with transformers on ``import quantkit``.

Importing transformers' quantizer registry (``transformers.quantizers.auto``) costs about as much as
importing quantkit itself, and only code that calls ``from_pretrained`` needs it (which imports it
anyway). So ``import quantkit`` does not import it: if it is already imported the registration
happens at once; otherwise a finder on ``sys.meta_path`` registers quantkit right after the registry
module finishes executing, i.e. before any ``from_pretrained`` can look a method up.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

from .._version import transformers_supported

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    # Importing the integration module registers it (at its end). If it is the module being
    # imported right now (it imports the registry), this returns it half-done and it registers
    # itself when it finishes.
    importlib.import_module("quantkit.formats.hf_quantizer")


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the registry module's loader: execute it, then register quantkit."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name: str):  # get_source, get_filename, ... for tools that ask the loader
        return getattr(self._inner, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate the real module
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if the registry is loaded, else when it is; a no-op on unsupported transformers."""
    if not transformers_supported():
        return
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
