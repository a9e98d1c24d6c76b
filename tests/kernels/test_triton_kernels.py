"""Triton kernels against the reference ops (the oracle) and against the float product.

Metrics, per op:

- W8A16: SQNR vs ``reference.w8a16_linear`` >= 45 dB in bf16 (60 dB fp16): the two differ only by
  where they round (the reference rounds the dequantized weight to the activation dtype, the kernel
  rounds once at the end), so the gap is the output dtype's rounding noise. SQNR vs the float
  product with the unquantized weight >= 35 dB (int8 per-channel weight error).
- W8A8: the int8 activations the fused kernel computes are read back through an identity weight and
  must equal the reference's (mismatch fraction <= 1e-4, and exactly on planted rounding ties); the
  int32 accumulator is exact, so the output SQNR vs the reference must reach the output dtype's
  rounding level (45 dB bf16, 60 dB fp16) and at most 1% of output elements may differ from it at
  all; vs the float product >= 30 dB (25 dB for static scales without smoothing).

On a machine without CUDA everything runs on CPU tensors through the Triton interpreter (see
conftest.py), at shapes small enough for it. Grid tests pass explicit block configs so that the GPU
runs the same tiles without autotuning every shape; the autotuned path has its own CUDA-only test.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from quantkit import kernels  # noqa: E402
from quantkit.kernels import reference  # noqa: E402
from quantkit.kernels import triton_kernels as tk  # noqa: E402
from quantkit.qmath import quantize_per_token, quantize_weight_per_channel, sqnr_db  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIN_SQNR_VS_REFERENCE = {torch.bfloat16: 45.0, torch.float16: 60.0, torch.float32: 100.0}
MIN_SQNR_W8A16_VS_FLOAT = 35.0
MIN_SQNR_W8A8_VS_FLOAT = 30.0
MAX_INT8_MISMATCH_FRACTION = 1e-4
MAX_OUTPUT_MISMATCH_FRACTION = 0.01


def _config(block_m: int, block_n: int, block_k: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 2}, num_warps=4, num_stages=2
    )


# (M, K, N, config): every M in {1, 3, 16, 33}, K in {7, 64, 96, 257}, N in {5, 64, 130} appears, with
# tiles that leave ragged edges in M, N and K (and none, for K = 64 with BLOCK_K = 32 or 64).
CASES = [
    (1, 64, 64, _config(16, 32, 32)),
    (3, 7, 5, _config(16, 32, 32)),
    (16, 96, 130, _config(16, 64, 64)),
    (33, 257, 64, _config(32, 64, 64)),
    (1, 257, 130, _config(16, 64, 64)),
    (3, 96, 5, _config(16, 32, 32)),
    (16, 64, 5, _config(16, 32, 64)),
    (33, 7, 130, _config(16, 128, 32)),
]
CASE_IDS = [f"M{m}-K{k}-N{n}" for m, k, n, _ in CASES]
DTYPES = [torch.bfloat16, torch.float16]


def _operands(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Activations with a few outlier channels (as in LLMs), a quantized weight and its float original."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    outliers = torch.randperm(k, generator=g)[: max(1, k // 16)]
    x[:, outliers] *= 8
    w = torch.randn(n, k, generator=g) / k**0.5
    q, s = quantize_weight_per_channel(w)
    # A per-input-channel pre-scale like SmoothQuant's smooth_inv: shrinks the outlier channels,
    # jitters the rest within [0.5, 2].
    smooth = torch.exp2(torch.empty(k).uniform_(-1, 1, generator=g))
    smooth[outliers] /= 8
    return {
        "x": x.to(dtype).to(device),
        "w": w.to(device),
        "q": q.to(device),
        "s": s.to(device),
        "bias": (0.1 * torch.randn(n, generator=g)).to(dtype).to(device),
        "smooth": smooth.to(device),
    }


def _float_product(x, w, bias=None, smooth=None) -> torch.Tensor:
    y = x.double() if smooth is None else x.double() * smooth.double()
    y = y @ w.double().T
    return y if bias is None else y + bias.double()


# ----------------------------------------------------------------------------------------------
# W8A16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "n", "config"), CASES, ids=CASE_IDS)
def test_w8a16_matches_reference(m, k, n, config, dtype, with_bias, device):
    o = _operands(m, k, n, dtype, device)
    bias = o["bias"] if with_bias else None
    y = tk.w8a16_linear(o["x"], o["q"], o["s"], bias, config=config)
    ref = reference.w8a16_linear(o["x"], o["q"], o["s"], bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert sqnr_db(ref, y) >= MIN_SQNR_VS_REFERENCE[dtype]
    assert sqnr_db(_float_product(o["x"], o["w"], bias), y) >= MIN_SQNR_W8A16_VS_FLOAT


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_w8a16_split_k(split_k, device):
    # K = 257 with BLOCK_K = 64 is 5 K tiles: split 3 gives chunks of 2, 2, 1 tiles, split 8 leaves
    # three programs with no K at all (they must contribute zeros).
    o = _operands(3, 257, 130, torch.bfloat16, device)
    y = tk.w8a16_linear(o["x"], o["q"], o["s"], o["bias"], split_k=split_k, config=_config(16, 64, 64))
    ref = reference.w8a16_linear(o["x"], o["q"], o["s"], o["bias"])
    assert sqnr_db(ref, y) >= MIN_SQNR_VS_REFERENCE[torch.bfloat16]


def test_w8a16_fp32_activations(device):
    o = _operands(3, 96, 64, torch.float32, device)
    y = tk.w8a16_linear(o["x"], o["q"], o["s"], o["bias"], config=_config(16, 32, 32))
    ref = reference.w8a16_linear(o["x"], o["q"], o["s"], o["bias"])
    assert y.dtype == torch.float32
    # A true fp32 dot (not TF32): agrees with the reference to fp32 rounding.
    assert sqnr_db(ref, y) >= MIN_SQNR_VS_REFERENCE[torch.float32]


# ----------------------------------------------------------------------------------------------
# W8A8
# ----------------------------------------------------------------------------------------------

W8A8_VARIANTS = {
    "dynamic": {},
    "dynamic-smooth-bias": {"smooth": True, "bias": True},
    "static": {"static": True},
    "static-smooth-bias": {"smooth": True, "bias": True, "static": True},
}
# Static per-tensor scales without smoothing are set by the x8 outlier channels, which leaves the
# other channels about 3 bits fewer: that variant is held to a lower floor vs the float product
# (measured: >= 29 dB, vs >= 32 dB for every other variant on these operands).
MIN_SQNR_W8A8_STATIC_UNSMOOTHED_VS_FLOAT = 25.0


def _w8a8_args(o: dict, variant: str) -> dict:
    v = W8A8_VARIANTS[variant]
    smooth = o["smooth"] if v.get("smooth") else None
    input_scale = None
    if v.get("static"):
        # What calibration would store: the abs-max over all tokens, on the smoothed activations.
        xs = o["x"].float() if smooth is None else o["x"].float() * smooth
        input_scale = xs.abs().amax() / 127
    return {"bias": o["bias"] if v.get("bias") else None, "smooth_inv": smooth, "input_scale": input_scale}


def _check_w8a8(y: torch.Tensor, o: dict, args: dict, dtype: torch.dtype) -> None:
    ref = reference.w8a8_linear(o["x"], o["q"], o["s"], **args)
    assert y.dtype == dtype and y.shape == ref.shape
    assert sqnr_db(ref, y) >= MIN_SQNR_VS_REFERENCE[dtype]
    # Same int8 operands and an exact int32 accumulator: outputs may differ only where the fp32
    # epilogue's last bit flips the final rounding (e.g. a fused multiply-add on the GPU).
    assert (y != ref).float().mean().item() <= MAX_OUTPUT_MISMATCH_FRACTION
    y_float = _float_product(o["x"], o["w"], args["bias"], args["smooth_inv"])
    unsmoothed_static = args["input_scale"] is not None and args["smooth_inv"] is None
    floor = MIN_SQNR_W8A8_STATIC_UNSMOOTHED_VS_FLOAT if unsmoothed_static else MIN_SQNR_W8A8_VS_FLOAT
    assert sqnr_db(y_float, y) >= floor


@pytest.mark.parametrize("variant", list(W8A8_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "k", "n", "config"), CASES, ids=CASE_IDS)
def test_w8a8_matches_reference(m, k, n, config, dtype, variant, device):
    o = _operands(m, k, n, dtype, device)
    args = _w8a8_args(o, variant)
    y = tk.w8a8_linear(o["x"], o["q"], o["s"], **args, config=config)
    _check_w8a8(y, o, args, dtype)


@pytest.mark.parametrize("variant", ["dynamic-smooth-bias", "static-smooth-bias"])
@pytest.mark.parametrize(("split_k", "prequantize"), [(2, False), (3, False), (8, False), (1, True), (3, True)])
def test_w8a8_split_k_and_prequantize(split_k, prequantize, variant, device):
    # Split-K partials are int32 and summed exactly, so every split must give the unsplit result.
    o = _operands(16, 257, 130, torch.bfloat16, device)
    args = _w8a8_args(o, variant)
    config = _config(16, 64, 64)
    y = tk.w8a8_linear(o["x"], o["q"], o["s"], **args, split_k=split_k, prequantize=prequantize, config=config)
    _check_w8a8(y, o, args, torch.bfloat16)
    assert torch.equal(y, tk.w8a8_linear(o["x"], o["q"], o["s"], **args, config=config))


def _probe_activations(k: int, dtype: torch.dtype, smooth: torch.Tensor) -> torch.Tensor:
    """Rows for reading back quantized activations: planted ties, an all-zero row, random rows, and
    a wide row that a static scale of 1.0 saturates at +-127."""
    g = torch.Generator().manual_seed(1)
    ties = torch.arange(k, dtype=torch.float32) % 21 - 10 + 0.5  # -9.5 ... 10.5: every value a tie
    ties[0] = 127.0  # amax 127 -> scale exactly 1.0, so x / scale hits the .5 ties exactly
    rows = [ties, torch.zeros(k), torch.randn(k, generator=g), 1e-3 * torch.randn(k, generator=g)]
    rows += [300 * torch.randn(k, generator=g)] + [torch.randn(k, generator=g) * 4 for _ in range(3)]
    x = torch.stack(rows)
    # Undo smooth_inv on the tie row so that x * smooth_inv lands on the ties again (powers of two).
    x[0] = x[0] / smooth
    return x.to(dtype)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("with_smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("path", ["fused", "fused-split3", "prequantize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_w8a8_int8_activations_equal_reference(dtype, path, with_smooth, static, device):
    # With weight = identity and weight_scale = 1 the op returns q(x) * x_scale, so the kernel's int8
    # activations can be read back as round(y / x_scale) (|q| <= 127 survives bf16 rounding).
    k = 96
    g = torch.Generator().manual_seed(2)
    smooth = torch.exp2(torch.randint(-1, 2, (k,), generator=g).float()) if with_smooth else torch.ones(k)
    x = _probe_activations(k, dtype, smooth).to(device)
    smooth_inv = smooth.to(device) if with_smooth else None
    input_scale = torch.tensor(1.0, device=device) if static else None
    eye = torch.eye(k, dtype=torch.int8, device=device)
    ones = torch.ones(k, device=device)
    kwargs = {"split_k": 3 if path == "fused-split3" else 1, "prequantize": path == "prequantize"}
    y = tk.w8a8_linear(x, eye, ones, None, smooth_inv, input_scale, config=_config(16, 32, 32), **kwargs)

    xq_ref, x_scale = reference.quantize_activations(x, smooth_inv, input_scale)
    xq = torch.round(y.float() / x_scale).to(torch.int8)
    mismatch = (xq != xq_ref).float().mean().item()
    assert mismatch <= MAX_INT8_MISMATCH_FRACTION
    # Ties round half to even, as torch.round does (round-half-away would give 10, -10, ... here).
    assert torch.equal(xq[0], xq_ref[0])
    expected_ties = [-8, -8, -6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10]  # -8.5 ... 10.5
    assert xq[0, 1:21].tolist() == expected_ties
    # The all-zero row quantizes to zeros with the clamped, nonzero scale.
    assert not xq[1].any() and bool(torch.isfinite(y[1]).all())


@pytest.mark.parametrize("path", ["fused", "fused-split3", "prequantize"])
def test_w8a8_near_zero_rows_use_the_clamped_scale(path, device):
    # Rows with abs-max below the 1e-8 floor of abs_max_scale quantize against the floor, not their
    # own abs-max (which would push every value to +-127). fp32 so the tiny outputs stay readable.
    g = torch.Generator().manual_seed(3)
    x = torch.stack([torch.zeros(64), 1e-9 * torch.randn(64, generator=g), torch.randn(64, generator=g)])
    x = x.to(device)
    eye = torch.eye(64, dtype=torch.int8, device=device)
    kwargs = {"split_k": 3 if path == "fused-split3" else 1, "prequantize": path == "prequantize"}
    y = tk.w8a8_linear(x, eye, torch.ones(64, device=device), config=_config(16, 32, 32), **kwargs)
    xq_ref, x_scale = reference.quantize_activations(x, None, None)
    assert torch.equal(torch.round(y / x_scale).to(torch.int8), xq_ref)
    assert xq_ref[1].abs().max() < 127 and not xq_ref[0].any()


def test_w8a8_fp32_activations(device):
    o = _operands(3, 96, 64, torch.float32, device)
    args = _w8a8_args(o, "dynamic-smooth-bias")
    y = tk.w8a8_linear(o["x"], o["q"], o["s"], **args, config=_config(16, 32, 32))
    _check_w8a8(y, o, args, torch.float32)


# ----------------------------------------------------------------------------------------------
# Shapes, predicates, heuristics, dispatch
# ----------------------------------------------------------------------------------------------


def test_batched_and_strided_inputs(device):
    o = _operands(6, 64, 32, torch.bfloat16, device)
    x3d = o["x"].reshape(2, 3, 64)
    wide = torch.cat([o["x"], o["x"]], dim=1)[:, ::2]  # a non-contiguous view: every other column
    cfg = _config(16, 32, 32)
    for x in (x3d, wide):
        y16 = tk.w8a16_linear(x, o["q"], o["s"], o["bias"], config=cfg)
        y8 = tk.w8a8_linear(x, o["q"], o["s"], o["bias"], config=cfg)
        assert y16.shape == y8.shape == (*x.shape[:-1], 32)
        ref16 = reference.w8a16_linear(x, o["q"], o["s"], o["bias"])
        assert sqnr_db(ref16, y16) >= MIN_SQNR_VS_REFERENCE[torch.bfloat16]
        assert sqnr_db(reference.w8a8_linear(x, o["q"], o["s"], o["bias"]), y8) >= 45.0


def test_supports_predicates():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q = torch.zeros(32, 64, dtype=torch.int8)
    for supports in (tk.w8a16_supports, tk.w8a8_supports):
        assert supports(x, q)
        assert supports(x.half(), q) and supports(x.float(), q)
        assert not supports(x.double(), q)  # no fp64 path: falls back to the reference
        assert not supports(x[:, :63], q)  # K mismatch
        assert not supports(x, q.float())  # weight must be int8
        assert not supports(x, torch.zeros(64, 32, dtype=torch.int8).T)  # non-contiguous weight
        assert not supports(x[:0], q)  # no rows
    big_k = tk.W8A8_MAX_K + 1
    assert not tk.w8a8_supports(torch.zeros(1, big_k), torch.zeros(1, big_k, dtype=torch.int8))
    assert tk.w8a16_supports(torch.zeros(1, big_k), torch.zeros(1, big_k, dtype=torch.int8))


def test_split_k_heuristic(monkeypatch):
    monkeypatch.setattr(tk, "_sm_count", lambda device: 132)  # an H100 SXM
    cuda = torch.device("cuda")
    down = tk.pick_split_k(1, 4096, 14336, cuda)  # 64 output tiles at decode: needs splitting
    gate = tk.pick_split_k(1, 14336, 4096, cuda)
    assert 1 < down <= tk.MAX_SPLIT_K and 14336 // down >= tk.MIN_K_PER_SPLIT
    assert gate < down and 4096 // gate >= tk.MIN_K_PER_SPLIT
    assert tk.pick_split_k(2048, 4096, 14336, cuda) == 1  # prefill never splits
    assert tk.pick_split_k(1, 4096, 14336, torch.device("cpu")) == 1


@pytest.mark.gpu
@requires_cuda
def test_dispatch_selects_triton():
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(128, 256, dtype=torch.int8, device="cuda")
    assert kernels.select("w8a16", x, q)[0] == "triton"
    assert kernels.select("w8a8", x, q)[0] == "triton"
    assert kernels.select("w8a8", x.double(), q)[0] != "triton"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 4, 300])
def test_autotuned_path(m):
    # The dispatcher's path: no config, so the autotuner (and, at decode, the split-K heuristic) runs.
    o = _operands(m, 1024, 512, torch.bfloat16, torch.device("cuda"))
    y16 = kernels.w8a16_linear(o["x"], o["q"], o["s"], o["bias"])
    assert sqnr_db(reference.w8a16_linear(o["x"], o["q"], o["s"], o["bias"]), y16) >= 45.0
    args = _w8a8_args(o, "dynamic-smooth-bias")
    _check_w8a8(kernels.w8a8_linear(o["x"], o["q"], o["s"], **args), o, args, torch.bfloat16)


def test_reference_per_token_quantization_is_the_contract():
    # The fused kernel reimplements quantkit.qmath's per-token rule; pin that rule here so a change
    # to it fails loudly next to the kernel that has to follow it.
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, 1.5]])
    q, scale = quantize_per_token(x)
    assert scale.item() == 1.0 and q.tolist() == [[127, 2, -4, 0, 2]]
