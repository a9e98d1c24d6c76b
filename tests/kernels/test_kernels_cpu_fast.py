"""The fused CPU kernels (quantkit.kernels.cpu_fused) and the eager CPU tier, against the reference.

W8A8 and the W8A16 dequantizing path repeat the reference's arithmetic in the same order, so they
must be *equal* to it (``torch.equal``), for every shape, dtype and layout; the packed W8A16 kernel
applies the scale in the activation dtype and is compared by SQNR. The dispatch must pick the fused
kernels where they apply and fall back to the eager paths (``QUANTKIT_COMPILE=0``) and to the
reference (``QUANTKIT_KERNELS=reference``).
"""

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny

import quantkit
from quantkit import QuantConfig, kernels
from quantkit.kernels import cpu, cpu_fused, reference
from quantkit.qmath import quantize_weight_per_channel, sqnr_db

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, K, N): decode rows, odd K (no SIMD multiple, below one vector), tails of 8 and 32, the
# default model's shapes, a prefill-sized M.
SHAPES = [(1, 64, 96), (3, 7, 5), (1, 1, 1), (2, 24, 16), (4, 33, 7), (17, 576, 192), (33, 96, 130), (5, 1536, 576)]
BIG = (512, 576, 1536)


@pytest.fixture
def fused(monkeypatch):
    """The built extension; tests needing it skip where there is no C++ toolchain."""
    monkeypatch.delenv("QUANTKIT_COMPILE", raising=False)
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    if cpu_fused.module() is None:
        pytest.skip("fused CPU kernels unavailable (no C++ compiler or ninja)")
    return cpu_fused


def _operands(m, k, n, dtype, seed=0):
    torch.manual_seed(seed + m * 1000 + k + n)
    x = (torch.randn(m, k) * 3).to(dtype)
    w, ws = quantize_weight_per_channel(torch.randn(n, k))
    b = torch.randn(n).to(dtype)
    smooth = torch.rand(k) + 0.5
    return x, w, ws, b, smooth


def _w8a8_variants(x, b, smooth):
    """(bias, smooth_inv, input_scale): none, bias, pre-scale, static scale, all."""
    static = (x.float().abs().amax() / 127).clamp_min(1e-3)
    return [(None, None, None), (b, None, None), (None, smooth, None), (None, None, static), (b, smooth, static)]


@pytest.mark.parametrize("m,k,n", [*SHAPES, BIG])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_w8a8_equals_reference(fused, m, k, n, dtype):
    x, w, ws, b, smooth = _operands(m, k, n, dtype)
    for bias, smooth_inv, input_scale in _w8a8_variants(x, b, smooth):
        ref = reference.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale)
        out = fused.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.equal(out, ref), (bias is not None, smooth_inv is not None, input_scale is not None)


@pytest.mark.parametrize("m,k,n", [*SHAPES, BIG])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_w8a8_equals_reference(m, k, n, dtype):
    x, w, ws, b, smooth = _operands(m, k, n, dtype)
    for bias, smooth_inv, input_scale in _w8a8_variants(x, b, smooth):
        ref = reference.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale)
        assert torch.equal(cpu.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_w8a8_layouts_and_edge_values(fused, dtype):
    x, w, ws, b, _ = _operands(6, 40, 24, dtype)
    # 3-D, transposed (non-contiguous) and misaligned (storage offset) activations.
    x3 = x.reshape(2, 3, 40)
    xt = x.T.contiguous().T
    buf = torch.randn(6 * 40 + 1).to(dtype)
    xm = buf[1:].view(6, 40)
    for xi in (x3, xt, xm):
        assert torch.equal(fused.w8a8_linear(xi, w, ws, b), reference.w8a8_linear(xi, w, ws, b))
        assert torch.equal(fused.w8a16_dequant(xi, w, ws, b), reference.w8a16_linear(xi, w, ws, b))
    # A non-contiguous weight view.
    wt = w.T.contiguous().T
    assert not wt.is_contiguous()
    assert torch.equal(fused.w8a8_linear(x, wt, ws, b), reference.w8a8_linear(x, w, ws, b))
    assert torch.equal(fused.w8a16_dequant(x, wt, ws, b), reference.w8a16_linear(x, w, ws, b))
    # An all-zero row (the scale is clamped, the output is the bias), huge and tiny values.
    xe = x.clone()
    xe[0] = 0
    xe[1, 0] = 1e4 if dtype != torch.float16 else 6e4
    xe[2] *= 1e-6
    assert torch.equal(fused.w8a8_linear(xe, w, ws, b), reference.w8a8_linear(xe, w, ws, b))
    # No rows at all.
    empty = torch.empty(0, 40, dtype=dtype)
    assert fused.w8a8_linear(empty, w, ws, b).shape == (0, 24)
    assert fused.w8a8_linear(x[0], w, ws, b).shape == (24,)  # 1-D input


@pytest.mark.parametrize("m,k,n", [*SHAPES, BIG])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_w8a16_dequant_equals_reference(fused, m, k, n, dtype):
    x, w, ws, b, _ = _operands(m, k, n, dtype)
    for bias in (None, b):
        ref = reference.w8a16_linear(x, w, ws, bias)
        out = fused.w8a16_dequant(x, w, ws, bias)
        assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_w8a16_packed_close_to_reference(fused, m, k, n, dtype):
    x, w, ws, b, _ = _operands(m, k, n, dtype)
    if not fused.packed_ok(x, w):
        # the only reasons to refuse: too many rows, or the bf16 kernel's K % 16 rule
        assert m > fused.PACKED_MAX_ROWS or (dtype == torch.bfloat16 and k % 16)
        return
    ref = reference.w8a16_linear(x, w, ws, b)
    out = fused.w8a16_packed(x, w, ws, b)
    assert out.dtype == dtype and out.shape == (m, n)
    # The packed kernel applies the scale in x.dtype: bf16/fp16 rounding, nothing worse.
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 35)


def test_packed_kernel_guards(fused):
    x, w, ws, _, _ = _operands(4, 64, 32, torch.bfloat16)
    assert fused.packed_ok(x, w)
    assert not fused.packed_ok(torch.randn(fused.PACKED_MAX_ROWS + 1, 64).bfloat16(), w)
    assert not fused.packed_ok(x[:, :24], w[:, :24])  # bf16 needs K % 16 == 0
    assert fused.packed_ok(x[:, :24].float(), w[:, :24].contiguous())
    # torch's kernel segfaults on a weight off its alignment: such weights must be refused.
    buf = torch.zeros(32 * 64 + 8, dtype=torch.int8)
    w_off = buf[8:].view(32, 64)
    w_off.copy_(w)
    assert w_off.data_ptr() % 64 and not fused.packed_ok(x, w_off)
    assert not cpu.w8a16_supports(x, w_off)
    # A misaligned activation is copied, not passed on: same result as an aligned one.
    xbuf = torch.zeros(4 * 64 + 8, dtype=torch.bfloat16)
    x_off = xbuf[8:].view(4, 64)
    x_off.copy_(x)
    assert x_off.data_ptr() % 32
    assert torch.equal(fused.w8a16_packed(x_off, w, ws), fused.w8a16_packed(x, w, ws))
    assert torch.equal(cpu.w8a16_linear(x_off, w, ws), cpu.w8a16_linear(x, w, ws))


def test_dispatch_picks_fused_and_falls_back(fused, monkeypatch):
    w = quantize_weight_per_channel(torch.randn(64, 48))[0]
    for m in (1, 7, 33, 512):
        x = torch.randn(m, 48).bfloat16()
        assert kernels.select("w8a8", x, w)[0] == "cpu_fused"
        want = "cpu_fused_int8pack" if m <= cpu_fused.PACKED_MAX_ROWS else "cpu_fused_dequant"
        assert kernels.select("w8a16", x, w)[0] == want
    odd_k = quantize_weight_per_channel(torch.randn(64, 40))[0]  # bf16 packed kernel needs K % 16
    assert kernels.select("w8a16", torch.randn(2, 40).bfloat16(), odd_k)[0] == "cpu_fused_dequant"
    assert kernels.select("w8a16", torch.randn(2, 40), odd_k)[0] == "cpu_fused_int8pack"  # fp32 is fine
    # The fused kernels take float activations only; anything else goes on down the list.
    assert kernels.select("w8a8", torch.ones(2, 48, dtype=torch.float64), w)[0] == "cpu_int_mm"

    monkeypatch.setenv("QUANTKIT_COMPILE", "0")
    x = torch.randn(2, 48).bfloat16()
    assert kernels.select("w8a8", x, w)[0] == "cpu_int_mm"
    assert kernels.select("w8a16", x, w)[0] == "cpu_int8pack"
    assert kernels.select("w8a16", torch.randn(64, 48).bfloat16(), w)[0] == "reference"
    monkeypatch.setenv("QUANTKIT_COMPILE", "1")
    monkeypatch.setenv("QUANTKIT_KERNELS", "reference")
    assert kernels.select("w8a8", x, w)[0] == "reference"
    assert kernels.select("w8a16", x, w)[0] == "reference"


@pytest.mark.parametrize("embeddings", ["int8", "float"])
@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_logits_fused_vs_reference(fused, scheme, dtype, embeddings):
    """A whole model: prefill-sized and single-token forwards give the reference's logits."""
    model = make_tiny("llama")
    stats = None
    if scheme == "w8a8":
        from quantkit.core.calibration import collect_stats

        torch.manual_seed(0)
        targets = quantkit.select_targets(model, QuantConfig())
        stats = collect_stats(model, torch.randint(0, 256, (2, 16)), targets, progress=False)
    # As the pipeline does: a model in the serving dtype, quantized (scales stay fp32).
    model = model.to(dtype)
    quantkit.quantize(model, QuantConfig(scheme=scheme, embeddings=embeddings), stats, progress=False)
    for ids in (torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 1))):
        with torch.no_grad():
            fast = model(input_ids=ids).logits
            with kernels.force_backend("reference"):
                ref = model(input_ids=ids).logits
        # Fused W8A8 and W8A16-dequant repeat the reference exactly; W8A16 on the packed path (<= 24
        # rows, also int8 lm_head's in a W8A8 model) accumulates in another order.
        all_w8a8 = scheme == "w8a8" and embeddings == "float"
        if all_w8a8 or ids.shape[1] > cpu_fused.PACKED_MAX_ROWS:
            assert torch.equal(fast, ref)
        else:
            assert sqnr_db(ref.float(), fast.float()) > 30


def test_peak_memory_in_a_fresh_process(tmp_path):
    """The eval's peak-memory figure: measured in a child process, weights included, libraries not."""
    from quantkit.evaluation import measure as evaluate

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is measured on Linux only")
    model = make_tiny("llama")
    quantkit.quantize(model, QuantConfig(scheme="w8a16"), progress=False)
    quantkit.save(model, tmp_path / "ck")
    ck = tmp_path / "ck"
    mem = evaluate.peak_memory(ck, kind="quantized", dtype="float32", prompt=torch.arange(8), decode_tokens=4)
    assert mem is not None
    assert mem["peak_rss_bytes"] == mem["baseline_rss_bytes"] + mem["peak_memory_bytes"]
    # The tiny model's weights are ~70 kB; the figure holds them and the KV cache, not the ~0.5 GB of
    # interpreter and libraries.
    assert 0 < mem["peak_memory_bytes"] < 64 << 20
    assert evaluate.peak_memory(tmp_path / "missing", kind="quantized", dtype="float32", prompt=torch.arange(8)) is None


@pytest.mark.parametrize("k", [1, 7, 63, 64, 65, 576, 1537])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_fused_w8a8_decode_gemv_is_exact(fused, m, k):
    """At <= 4 rows the int8 product comes from a GEMV (VNNI or AVX2; QUANTKIT_GEMV=avx2 in CI runs the
    AVX2 one too), else _int_mm: exact either way, for K not a multiple of a vector, past the row limit."""
    for n in (1, 5, 130):
        x, w, ws, b, smooth = _operands(m, k, n, torch.bfloat16)
        x[0, 0] = -x[0].abs().max() * 2  # a row whose quantized values include -127 (the u8 shift's edge)
        for bias, smooth_inv, input_scale in _w8a8_variants(x, b, smooth):
            ref = reference.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale)
            assert torch.equal(fused.w8a8_linear(x, w, ws, bias, smooth_inv, input_scale), ref), (n, bias is not None)
    assert fused.module().gemv_kind() in ("vnni", "avx2", "")


@pytest.mark.parametrize("k", [1, 7, 15, 16, 17, 576, 1537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_decode_gemv_is_close_and_row_independent(fused, k, dtype):
    """At <= 4 tokens per sequence W8A16 runs the extension's GEMV (fp32 accumulation, another order
    than the reference's GEMM): close to the reference, and each row's output the same alone or in
    any batch, K tails included."""
    for m in (1, 2, 3, 4, 5, 9):
        for n in (1, 5, 130):
            x, w, ws, b, _ = _operands(m, k, n, dtype)
            ref = reference.w8a16_linear(x, w, ws, b)
            out = fused.w8a16_packed(x[:, None], w, ws, b)[:, 0]  # m sequences of one token
            assert out.dtype == dtype
            assert sqnr_db(ref.float(), out.float()) > (100 if dtype == torch.float32 else 40), (m, n)
            alone = torch.cat([fused.w8a16_packed(x[i : i + 1, None], w, ws, b)[:, 0] for i in range(m)])
            assert torch.equal(out, alone)
    assert fused.w16_gemv_kind() in ("avx512", "avx2", "")


# Kernel choices (QUANTKIT_GEMV, QUANTKIT_INT8_GEMM) are read once per process: tests that force one
# run in a fresh interpreter, after this prelude.
_PRELUDE = (
    "import torch; from quantkit.kernels import cpu_fused, reference; "
    "from quantkit.qmath import quantize_weight_per_channel as q; torch.manual_seed(0)\n"
    "mod = cpu_fused.module()\n"
    "if mod is None: print('none'); raise SystemExit\n"
)


def _last_line_in_fresh_process(body: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _PRELUDE + body], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return (run.stdout.strip().splitlines() or [""])[-1]


@pytest.mark.parametrize("kind", ["fp32", "avx2"])
def test_int8_gemms_without_vnni_are_exact(kind):
    """The int8 GEMMs for CPUs without native int8 dot products, forced (QUANTKIT_INT8_GEMM): "avx2"
    (vpmaddubsw, the default there) and "fp32" (int8 values through the fp32 GEMM in chunks of K =
    1032) give the reference's outputs bit for bit, also where every activation is +-127, the weights
    are large (some -128) and the sums pass 2^24, and at shapes that leave partial tiles (M, N and K
    not multiples of the kernel's 4 rows, 16 columns and 4 x 8 bytes). With fp32 GEMMs allowed to run
    in bf16, "fp32" hands over to _int_mm."""
    if kind == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the AVX2 int8 GEMM needs an AVX2 CPU")
    body = (
        "shapes = ((5, 576, 192), (33, 1032, 7), (9, 1033, 33), (17, 2100, 5), (6, 4096, 3), (7, 1, 4),"
        " (70, 100, 40), (301, 64, 16), (8, 3, 17))\n"
        "for m, k, n in shapes:\n"
        "    for extreme in (False, True):\n"
        "        x = torch.randn(m, k); w = torch.randn(n, k)\n"
        "        if extreme: x = torch.ones(m, k); w = -torch.ones(n, k)  # every activation 127\n"
        "        if extreme and m % 2: x = -x  # every activation -127\n"
        "        wq, s = q(w); x = x.bfloat16()\n"
        "        if extreme: wq = torch.randint(100, 128, (n, k), dtype=torch.int8)  # large odd sums, > 2^24\n"
        "        if extreme: wq[:, ::7] = -128  # the op takes any int8 weight\n"
        "        assert torch.equal(cpu_fused.w8a8_linear(x, wq, s), reference.w8a8_linear(x, wq, s)), (m, k, n)\n"
        "for m, k in ((5, 1032), (7, 1033), (9, 4096), (6, 5000)):  # the int32 product itself, exactly\n"
        "    a = torch.full((m, k), 127, dtype=torch.int8); b = torch.randint(-128, 128, (3, k), dtype=torch.int8)\n"
        "    b[0] = torch.randint(100, 128, (k,), dtype=torch.int8)  # sums far past 2^24, odd\n"
        "    assert torch.equal(mod.int8_matmul(a, b), a.int() @ b.int().t()), (m, k)\n"
        "    assert torch.equal(mod.int8_matmul(-a, b), -a.int() @ b.int().t()), (m, k)\n"
        "for m, k, n in ((0, 8, 3), (6, 0, 3), (6, 8, 0)):  # empty operands: an empty or all-zero result\n"
        "    a = torch.ones(m, k, dtype=torch.int8); b = torch.ones(n, k, dtype=torch.int8)\n"
        "    assert torch.equal(mod.int8_matmul(a, b), torch.zeros(m, n, dtype=torch.int32)), (m, k, n)\n"
        "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'  # fp32 GEMMs not exact: _int_mm instead\n"
        "assert torch.equal(cpu_fused.w8a8_linear(x, wq, s), reference.w8a8_linear(x, wq, s))\n"
        "print(mod.int8_gemm_kind())"
    )
    assert _last_line_in_fresh_process(body, QUANTKIT_INT8_GEMM=kind) in (kind, "none")


def test_avx2_gemv_is_exact_too():
    """The AVX2 GEMVs, forced (QUANTKIT_GEMV=avx2): W8A8 gives the reference's outputs (also its int32
    product at the extremes: activations +-127, weights -128), W8A16 is close and row-independent."""
    body = (
        "for m, k, n in ((1, 576, 192), (4, 65, 33), (3, 1537, 7), (2, 15, 5)):\n"
        "    x = torch.randn(m, k).bfloat16(); w, s = q(torch.randn(n, k))\n"
        "    assert torch.equal(cpu_fused.w8a8_linear(x, w, s), reference.w8a8_linear(x, w, s)), (m, k, n)\n"
        "    x = x.float(); ref = reference.w8a16_linear(x, w, s)\n"
        "    out = cpu_fused.w8a16_packed(x[:, None], w, s)[:, 0]\n"
        "    assert (ref - out).norm() < 1e-5 * ref.norm(), (m, k, n)  # the AVX2 W8A16 GEMV\n"
        "    assert torch.equal(out[-1:], cpu_fused.w8a16_packed(x[-1:, None], w, s)[:, 0])\n"
        "for m, k, n in ((1, 31, 3), (2, 32, 5), (3, 33, 4), (4, 576, 7), (1, 5000, 2)):  # the int32 product\n"
        "    for sign in (1, -1):  # every activation +-127, weights large and some -128: exact\n"
        "        a = torch.full((m, k), 127 * sign, dtype=torch.int8)\n"
        "        b = torch.randint(100, 128, (n, k), dtype=torch.int8); b[:, ::5] = -128\n"
        "        assert torch.equal(mod.int8_matmul(a, b), a.int() @ b.int().t()), (m, k, n)\n"
        "for m, k, n in ((0, 8, 3), (2, 0, 3), (2, 8, 0)):  # empty operands\n"
        "    a = torch.ones(m, k, dtype=torch.int8); b = torch.ones(n, k, dtype=torch.int8)\n"
        "    assert torch.equal(mod.int8_matmul(a, b), torch.zeros(m, n, dtype=torch.int32)), (m, k, n)\n"
        "print(mod.gemv_kind(), mod.w16_gemv_kind())"
    )
    # "" where the CPU has no AVX2 (and FMA)
    assert _last_line_in_fresh_process(body, QUANTKIT_GEMV="avx2") in ("avx2 avx2", "none", "")


def test_fused_kernels_are_dispatcher_ops_with_meta_shapes(fused):
    """torch.ops.quantkit.* run the same kernels, and their Meta versions give shapes to fake tensors and
    torch.compile (here through AOTAutograd, which traces with them), so compiled code can call them."""
    x, w, ws, b, smooth = _operands(3, 64, 40, torch.bfloat16)
    x = x.view(1, 3, 64)
    ops = torch.ops.quantkit
    assert torch.equal(
        ops.w8a8_linear(x, w, ws, b, smooth, None), fused.module().w8a8_linear(x, w, ws, b, smooth, None)
    )
    assert torch.equal(ops.w8a16_packed(x, w, ws, b), fused.module().w8a16_packed(x, w, ws, b))
    assert torch.equal(ops.w8a16_dequant(x, w, ws, None), reference.w8a16_linear(x, w, ws, None))
    meta = ops.w8a8_linear(x.to("meta"), w.to("meta"), ws.to("meta"))
    assert meta.device.type == "meta" and meta.shape == (1, 3, 40) and meta.dtype == torch.bfloat16

    def f(x):
        return ops.w8a16_dequant(ops.w8a8_linear(x, w, ws, b, smooth, None).relu()[..., :32].contiguous(), w2, ws2)

    w2, ws2 = quantize_weight_per_channel(torch.randn(16, 32))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))
