"""Batch invariance: a sequence's outputs are the same, bit for bit, alone or in any batch.

Every fast path chooses its kernel, tiles and K split from the tokens per sequence, never from the
batch size, and the float GEMM of the W8A16 dequantizing path runs once per sequence (MKL and oneDNN
round differently for different row counts: fp32 at M = 1, 2-15 and 16+ on the CI's Xeon). Checked
per op for every CPU backend (the packed ``_weight_int8pack_mm`` path included) and the reference,
through the Triton wrappers' launch choices, and on whole models.
"""

import pytest
import torch
import transformers

import quantkit
from quantkit import QuantConfig, kernels
from quantkit.kernels import cpu_fused, reference
from quantkit.kernels.registry import _IMPLS
from quantkit.qmath import quantize_weight_per_channel

# Default-model shapes (576 -> 1536): the shapes on which torch's fp32 GEMM rounds by row count.
K, N = 576, 1536
SEQ_LENS = [1, 5, 24, 25, 40]
BATCHES = [2, 3, 7]


def _cpu_backends(op: str) -> list[str]:
    return [i.backend for i in _IMPLS[op] if i.device_type == "cpu"] + ["reference"]


def _operands(dtype: torch.dtype, seq_len: int, batch: int):
    torch.manual_seed(seq_len * 31 + batch)
    x = (torch.randn(batch, seq_len, K) * 2).to(dtype)
    w, ws = quantize_weight_per_channel(torch.randn(N, K))
    return x, w, ws, torch.randn(N).to(dtype), torch.rand(K) + 0.5


def _run(op: str, x: torch.Tensor, w, ws, bias, smooth) -> torch.Tensor:
    if op == "w8a16":
        return kernels.w8a16_linear(x, w, ws, bias)
    return kernels.w8a8_linear(x, w, ws, bias, smooth)


def _check(op: str, backend: str, x: torch.Tensor, *operands) -> bool:
    """Run ``op`` on the batch and on each sequence alone through ``backend``; False if it does not take them."""
    w = operands[0]
    with kernels.force_backend(backend):
        if {kernels.select(op, xi, w)[0] for xi in (x, x[:1])} != {backend}:
            return False  # this backend does not take this shape: nothing to check here
        batched = _run(op, x, *operands)
        for b in range(x.shape[0]):
            alone = _run(op, x[b : b + 1].clone(), *operands)
            assert torch.equal(batched[b : b + 1], alone), f"{op}/{backend}: sequence {b} of {tuple(x.shape)}"
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["w8a16", "w8a8"])
def test_every_cpu_backend_is_batch_invariant(op, dtype, monkeypatch):
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    checked = set()
    for backend in _cpu_backends(op):
        for seq_len in SEQ_LENS:
            for batch in BATCHES:
                x, *operands = _operands(dtype, seq_len, batch)
                if _check(op, backend, x, *operands):
                    checked.add((backend, seq_len))
    fused = {"cpu_fused", "cpu_fused_int8pack", "cpu_fused_dequant"}
    # Every backend was exercised: the packed path on short sequences, the GEMM path on long ones.
    assert {b for b, _ in checked} == set(_cpu_backends(op)) - (fused if cpu_fused.module() is None else set())
    if op == "w8a16" and cpu_fused.module() is not None:
        assert {("cpu_fused_int8pack", 1), ("cpu_fused_int8pack", 24), ("cpu_fused_dequant", 25)} <= checked


def test_w8a16_path_is_chosen_per_sequence_not_per_batch(monkeypatch):
    """The regression: rows of the whole batch used to pick the path (packed up to 24 rows)."""
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    w = quantize_weight_per_channel(torch.randn(N, K))[0]
    for batch in (1, 2, 30):
        x = torch.randn(batch, 16, K).bfloat16()
        names = {kernels.select("w8a16", x, w)[0]}
        assert names <= {"cpu_fused_int8pack", "cpu_int8pack"}, (batch, names)
    assert reference.rows_per_sequence(torch.empty(4, 9, K)) == 9
    assert reference.rows_per_sequence(torch.empty(9, K)) == 9  # 2-D: one sequence of 9 rows
    assert reference.rows_per_sequence(torch.empty(K)) == 1


def test_triton_choices_depend_on_sequence_length_only(monkeypatch):
    """The Triton wrappers pick regime, autotuning bucket and split-K from tokens per sequence."""
    tk = pytest.importorskip("quantkit.kernels.triton_kernels")
    seen = []
    monkeypatch.setattr(tk, "pick_split_k", lambda rows, n, k, device: seen.append(("split", rows)) or 1)

    def launch(tuned, heur, config, grid_args, *args, **kwargs):
        seen.append(("launch", grid_args[3], args[-1]))  # tokens per sequence, M bucket

    monkeypatch.setattr(tk, "_launch", launch)
    w, ws = quantize_weight_per_channel(torch.randn(64, 32))
    for batch in (1, 4, 64):
        seen.clear()
        x = torch.randn(batch, 3, 32)
        tk.w8a16_linear(x, w, ws)
        tk.w8a8_linear(x, w, ws)
        assert seen == [("split", 3), ("launch", 3, 4)] * 2, (batch, seen)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_logits_do_not_depend_on_the_batch(scheme, dtype, monkeypatch):
    """Whole model (int8 lm_head included): a sequence's logits alone == its logits among others."""
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    # The default model's widths (and GQA), so the GEMMs are large enough to round by row count.
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=K, intermediate_size=N, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stats = None
    if scheme == "w8a8":
        from quantkit.core.calibration import collect_stats

        torch.manual_seed(0)
        stats = collect_stats(
            model, torch.randint(0, 4096, (2, 16)), quantkit.select_targets(model, QuantConfig()), progress=False
        )
    model = model.to(dtype)
    quantkit.quantize(model, QuantConfig(scheme=scheme, embeddings="int8"), stats, progress=False)
    torch.manual_seed(1)
    for seq_len in (1, 8, 40):
        ids = torch.randint(0, 4096, (5, seq_len))
        with torch.no_grad():
            batched = model(input_ids=ids).logits
            for b in range(ids.shape[0]):
                assert torch.equal(model(input_ids=ids[b : b + 1]).logits, batched[b : b + 1]), (seq_len, b)
