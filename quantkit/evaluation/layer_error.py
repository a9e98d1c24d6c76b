"""Per-layer error: where in the network a quantized model departs from its float source.

Metric: the output SQNR (dB) of every quantized linear layer *in situ*: the float model and the
quantized model each run the same tokens end to end, and each quantized layer's output is compared
with the same layer's output in the float model. A linear layer's output does not change under
SmoothQuant (``(x / s)(W s)^T = x W^T``), so the comparison is valid for smoothed layers too, and
the figure includes the error that reached the layer from earlier ones: a dip shows a layer that
quantizes badly, a downward trend shows error accumulating with depth.

Cost: one forward pass of each model over ``tokens`` tokens (128 by default); the float outputs of
the quantized layers are held in memory meanwhile.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..formats import served
from ..formats.float_models import load_float
from ..formats.inspect import inspect
from ..formats.native import load, read_record
from ..qmath import sqnr_db
from . import measure

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 128


def _capture(model: nn.Module, names: list[str], fn) -> list:
    modules = dict(model.named_modules())
    return [modules[n].register_forward_hook(lambda mod, args, out, n=n: fn(n, out)) for n in names if n in modules]


@torch.no_grad()
def layer_output_sqnr(float_model: nn.Module, quant_model: nn.Module, ids: torch.Tensor, names: list[str]):
    """``{layer name: output SQNR in dB}`` for ``names``, both models run on ``ids`` ``[1, T]``."""
    reference: dict[str, torch.Tensor] = {}
    result: dict[str, float] = {}
    hooks = _capture(float_model, names, lambda n, out: reference.__setitem__(n, out.detach().float().cpu()))
    try:
        float_model(input_ids=ids.to(next(float_model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    def compare(n: str, out: torch.Tensor) -> None:
        if n in reference:
            result[n] = round(sqnr_db(reference.pop(n), out.detach().float().cpu()), 3)

    hooks = _capture(quant_model, names, compare)
    try:
        quant_model(input_ids=ids.to(next(quant_model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # Keep module order (the plot's x axis); inf (exact layers) is not JSON: cap at 200 dB.
    return {n: min(result[n], 200.0) for n in names if n in result}


def attach_layer_errors(
    results: dict[str, Any],
    baseline: str | Path,
    checkpoints: dict[str, Path],
    *,
    text: str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Add ``layer_sqnr_db`` to each quantized row of ``results`` and the protocol as ``layer_error``.

    The float model runs in fp32; each checkpoint in the dtype its row's perplexity was measured in.
    Returns ``results`` (modified in place).
    """
    device = resolve_device(device)
    float_model, tokenizer, _ = load_float(baseline, dtype=torch.float32, device=device, progress=progress)
    ids = measure.windows(measure.eval_token_ids(tokenizer, text), tokens, 1, bos=measure.bos_id(tokenizer))
    rows = {r["name"]: r for r in results["rows"]}
    for name, path in tqdm(checkpoints.items(), desc="Per-layer error", unit="model", disable=not progress):
        row = rows.get(name)
        if row is None:
            continue
        dtype = getattr(torch, row.get("dtype", "float32"))
        if row.get("format") == "compressed-tensors":  # as transformers loads it (see quantkit eval)
            quant_model = served.load_export(path, dtype, device)
            names = inspect(path).quantized
        else:
            quant_model = load(path, dtype=dtype, device=device)
            names = list(read_record(path).modules)
        row["layer_sqnr_db"] = layer_output_sqnr(float_model, quant_model, ids, names)
        del quant_model
        gc.collect()
    results["layer_error"] = {
        "metric": "output SQNR (dB) of each quantized linear layer in situ, vs the float (fp32) model",
        "text": Path(text or measure.DEFAULT_EVAL_TEXT).name,
        "tokens": int(ids.shape[1]),
    }
    return results
