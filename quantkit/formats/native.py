"""Quantized checkpoints: safetensors + ``config.json`` with a versioned ``quantization_config``.

Layout of a checkpoint folder::

    config.json             the model's config, plus quantization_config (see QuantRecord.to_dict)
    model.safetensors       float tensors as in the source model; for each quantized layer
                            <name>.weight (int8 [out, in]), <name>.weight_scale (fp32 [out]),
                            optional <name>.bias, <name>.smooth_inv (fp32 [in]), <name>.input_scale
                            with int8 embeddings, the input embedding's table <name>.weight (int8
                            [vocab, hidden]) and <name>.weight_scale (fp32 [vocab]); lm_head's
                            likewise unless tied to it (then stored once, under the embedding)
    generation_config.json, tokenizer files

A checkpoint bigger than one shard (``max_shard_size``, 5 GB by default) holds the same tensors in
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``, as Hugging Face
shards. :func:`load` reads one tensor at a time (no file is memory-mapped), so loading needs about
the checkpoint's bytes of memory.

Nothing is ever unpickled. Writes go to a temporary sibling folder that is renamed into place only
when complete, so an interrupted run never leaves a half-written output directory
(:mod:`quantkit.formats.output_dir`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import DEFAULT_MAX_SHARD_SIZE, QuantConfig
from ..core.modules import (
    SCALE_BUFFERS,
    Int8Embedding,
    Int8TiedHead,
    is_float_embedding,
    make_empty,
    replace_module,
    weight_out_in,
)
from ..core.record import QuantRecord, record_of
from ..core.sequential import Emit
from ..errors import QuantkitError
from ..qmath import all_finite
from .float_models import refuse_remote_code
from .output_dir import atomic_output_dir
from .safetensors_io import CheckpointReader
from .shard_writer import ShardWriter, parse_size
from .validate import check_finite, raise_problems, scale_problems, tensor_problems

log = logging.getLogger(__name__)


def save(
    model: nn.Module,
    out: str | Path,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a quantized model (from :func:`quantkit.quantize`) to ``out``.

    Tensors go into shards of at most ``max_shard_size`` (bytes, or ``"5GB"``, ``"500MB"``, ``"2GiB"``);
    a model that fits in one is a single ``model.safetensors``, as Hugging Face writes it.

    Example:
        >>> quantkit.save(model, "smollm2-w8a8", tokenizer)
    """
    record_of(model)  # validate before writing anything
    max_shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out, overwrite) as tmp, ShardWriter(tmp, max_shard_bytes) as writer:
        writer.add(unique_state_dict(model))
        writer.close()
        write_metadata(model, tmp, tokenizer)
    log.info("wrote %s", out)
    return Path(out)


def tensor_emitter(writer: ShardWriter) -> Emit:
    """An ``emit`` for :func:`quantkit.core.sequential.quantize_layerwise`: writes each finished module's
    tensors under its prefix (tensors on the meta device, i.e. layers already written, are skipped)."""

    def emit(prefix: str, module: nn.Module) -> None:
        writer.add({prefix + k: v for k, v in unique_state_dict(module).items()})

    return emit


def write_metadata(model: nn.Module, folder: Path, tokenizer=None) -> None:
    """Everything of a quantkit checkpoint but its tensors: ``config.json`` (with the record),
    the generation config, the tokenizer."""
    # config.dtype is what from_pretrained(dtype="auto") and servers load in; model.to() does not
    # update it, so record the dtype the float tensors really have.
    model.config.dtype = float_dtype(model)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters (its embeddings, norms, unquantized layers)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared storage written once, under its first name.

    Tied weights (``lm_head.weight`` is ``embed_tokens.weight``) share storage; the first name in
    module order is the input embedding, which ``tie_weights()`` copies back to the output on load.
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.is_meta:  # not materialized (a layer already written by the layer-by-layer pipeline)
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous()
    return out


def read_record(path: str | Path) -> QuantRecord:
    """The checkpoint's :class:`QuantRecord` (what was quantized, and how), from ``config.json`` alone."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise QuantkitError(f"{path} has no config.json; is it a model folder?")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantkitError(f"{cfg_file} is not valid JSON; the checkpoint is damaged") from None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc is None:
        raise QuantkitError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    try:
        return QuantRecord.from_dict(qc)
    except QuantkitError as e:
        raise QuantkitError(f"{path}: {e}") from None


def read_quant_config(path: str | Path) -> QuantConfig:
    """The :class:`QuantConfig` a checkpoint was made with (its record: :func:`read_record`)."""
    return read_record(path).config


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a quantkit checkpoint as a transformers model whose ``generate()`` works.

    Args:
        path: a folder written by :func:`save` (or ``quantkit quantize``).
        device: where to put the model.
        dtype: activation/float-weight dtype; the checkpoint's own dtype by default. Quantized
            layers keep their int8 weights and fp32 scales whatever the dtype.

    The round trip ``save`` -> ``load`` is bit-exact. After ``import quantkit``,
    ``AutoModelForCausalLM.from_pretrained(path, dtype=...)`` gives the same model.
    """

    path = Path(path)
    record, config, qc_dict = _read_config(path)
    cast = dtype is not None
    dtype = _float_dtype(dtype or getattr(config, "dtype", None) or torch.float32, path)

    with CheckpointReader(path) as reader:
        model = _empty_model(config, record, reader, dtype)
        raise_problems(path, _problems(model, record, reader))
        # One tensor at a time, straight into the skeleton: the reader gives fresh 64-byte aligned
        # memory (torch's AVX-512 int8 kernels crash on misaligned weights), so memory grows by each
        # tensor's bytes and no more. Float tensors follow ``dtype`` (as from_pretrained casts them),
        # except the quantized layers' fp32 scales, which the skeleton declares fp32.
        keep = {f"{n}.{b}" for n in record.quantized_modules for b in SCALE_BUFFERS}
        for name, t in reader.items():
            check_finite(name, t, path)
            if cast and t.is_floating_point() and name not in keep and t.dtype != dtype:
                t = t.to(dtype)
            _assign(model, name, t, reader.file_of(name))
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise QuantkitError(f"{path} lacks tensors {still_meta[:3]}; the checkpoint is incomplete")
    model.config.quantization_config = qc_dict
    return model.to(device).eval()


def checkpoint_problems(path: str | Path) -> list[str]:
    """What :func:`load` would refuse in the checkpoint at ``path``: read from the headers, the scales
    and the float tensors (norms, biases, float embeddings), not the int8 weights."""
    path = Path(path)
    record, config, _ = _read_config(path)
    with CheckpointReader(path) as reader:
        model = _empty_model(config, record, reader, _float_dtype(getattr(config, "dtype", None) or "float32", path))
        problems = _problems(model, record, reader)
        if not problems:
            floats = [n for n in reader.keys() if reader.info(n).dtype.is_floating_point]
            problems = [f"tensor {n} holds NaN or Inf" for n in floats if not all_finite(reader.get(n))]
        return problems


def _read_config(path: Path):
    """``(record, transformers config without its quantization_config, the quantization_config block)``."""
    from transformers import AutoConfig

    record = read_record(path)
    refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise QuantkitError(f"cannot read the config of {path}: {str(e).splitlines()[0]}") from None
    qc_dict = config.quantization_config
    del config.quantization_config  # build the float skeleton, then swap in quantized modules
    return record, config, qc_dict


def _float_dtype(dtype: torch.dtype | str, path: Path) -> torch.dtype:
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise QuantkitError(f"{path}: dtype {dtype!r} is not a float dtype; fix config.json or pass a dtype")
    return value


def _empty_model(config, record: QuantRecord, reader: CheckpointReader, dtype: torch.dtype) -> nn.Module:
    """The model with quantkit's modules swapped in, parameters on the meta device (no memory, no
    random init); buffers such as rotary tables are real, as checkpoints do not store them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_in_empty_modules(model, record, set(reader.keys()), dtype)
    return model


def _problems(model: nn.Module, record: QuantRecord, reader: CheckpointReader) -> list[str]:
    infos = {name: reader.info(name) for name in reader.keys()}
    return tensor_problems(model, record, infos) or scale_problems(reader.get, record, set(infos))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, file: Path) -> None:
    """Put one checkpoint tensor into the model in place of its meta placeholder (as
    ``load_state_dict(assign=True)`` does, on the owning module only)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        module = None
    if module is None or (attr not in module._parameters and attr not in module._buffers):
        raise QuantkitError(f"{file} has tensor {name}, which the model has not")
    current = getattr(module, attr)
    if current is not None and current.shape != tensor.shape:
        raise QuantkitError(f"{file}: tensor {name} is {list(tensor.shape)}, the model's is {list(current.shape)}")
    result = module.load_state_dict({attr: tensor}, strict=False, assign=True)
    if result.unexpected_keys:  # a non-persistent buffer
        raise QuantkitError(f"{file} has tensor {name}, which the model does not store")


def swap_in_empty_modules(model: nn.Module, record: QuantRecord, keys: set[str], dtype: torch.dtype) -> None:
    """Replace a skeleton's float modules by empty quantized ones (on the meta device), as the
    checkpoint's ``record`` lists them; ``keys`` (the checkpoint's tensor names) tell which optional
    buffers exist. Used by :func:`load` and by the transformers integration.
    """

    def float_module(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise QuantkitError(f"checkpoint lists quantized module {name}, which this model has not") from None

    def empty_linear(name: str, scheme: str) -> nn.Module:
        out_f, in_f = weight_out_in(float_module(name)).shape
        kw = {}
        if scheme == "w8a8":
            kw = {"has_smooth": f"{name}.smooth_inv" in keys, "static": f"{name}.input_scale" in keys}
        # Whether a bias exists is the architecture's to say, not the files': a deleted bias is an error.
        has_bias = getattr(float_module(name), "bias", None) is not None
        return make_empty(scheme, in_f, out_f, has_bias, dtype, device="meta", **kw)

    for name in record.modules:
        replace_module(model, name, empty_linear(name, record.scheme_of(name)))
    embedding = None
    if record.input_embedding:
        float_emb = float_module(record.input_embedding)
        if not is_float_embedding(float_emb):
            raise QuantkitError(f"{record.input_embedding} is a {type(float_emb).__name__}, not an embedding")
        embedding = Int8Embedding.like(float_emb, dtype, device="meta")
        replace_module(model, record.input_embedding, embedding)
    if record.output_embedding and record.tied_embeddings:  # reads the input embedding's table
        name = record.output_embedding
        bias = None
        if f"{name}.bias" in keys:
            bias = torch.empty(float_module(name).out_features, dtype=dtype, device="meta")
        replace_module(model, name, Int8TiedHead(embedding, bias))
    elif record.output_embedding:  # weight-only whatever the scheme
        replace_module(model, record.output_embedding, empty_linear(record.output_embedding, "w8a16"))
