"""CPU backends and the dispatch point, against the reference (the oracle).

These tests cover the eager CPU tier (``cpu_int_mm``, ``cpu_int8pack``). The fused C++ kernels
(``quantkit.kernels.cpu_fused``) are registered ahead of it and are switched off here with
``QUANTKIT_COMPILE=0``; tests/kernels/test_kernels_cpu_fast.py covers them.
"""

import inspect

import pytest
import torch

from quantkit import kernels
from quantkit.kernels import cpu, reference
from quantkit.qmath import quantize_weight_per_channel, sqnr_db

SHAPES = [(1, 64, 96), (3, 7, 5), (17, 576, 192), (33, 96, 130), (2, 24, 16)]


@pytest.fixture(autouse=True)
def eager_tier(monkeypatch):
    monkeypatch.setenv("QUANTKIT_COMPILE", "0")


def _operands(m, k, n, dtype, bias):
    torch.manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k).to(dtype)
    w_float = torch.randn(n, k)
    w, ws = quantize_weight_per_channel(w_float)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w_float, w, ws, b


def test_int8_mm_is_exact():
    a = torch.randint(-127, 128, (9, 300), dtype=torch.int8)
    b = torch.randint(-127, 128, (11, 300), dtype=torch.int8)
    exact = a.long() @ b.long().T
    assert torch.equal(reference.int8_mm(a, b).long(), exact)
    assert torch.equal(torch._int_mm(a, b.T).long(), exact)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_cpu_matches_reference(m, k, n, dtype, bias):
    x, w_float, w, ws, b = _operands(m, k, n, dtype, bias)
    smooth = torch.rand(k) + 0.5
    for smooth_inv, input_scale in [(None, None), (smooth, None), (None, x.float().abs().max() / 127)]:
        ref = reference.w8a8_linear(x, w, ws, b, smooth_inv, input_scale)
        name, fn = kernels.select("w8a8", x, w)
        assert name == "cpu_int_mm"
        out = fn(x, w, ws, b, smooth_inv, input_scale)
        # Same int8 operands and exact int32 sums: only the fp32 epilogue order may differ.
        assert out.dtype == dtype and out.shape == (m, n)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-4)
    # and against the float product: W8A8 of Gaussian data keeps ~30 dB
    xs = x.float()
    assert sqnr_db(xs @ w_float.T + (0 if b is None else b.float()), kernels.w8a8_linear(x, w, ws, b).float()) > 25


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_w8a16_dispatch_matches_reference(m, k, n, dtype):
    x, _, w, ws, b = _operands(m, k, n, dtype, True)
    name, fn = kernels.select("w8a16", x, w)
    # torch's bf16 int8pack kernel is wrong unless K % 16 == 0, and it only pays off for few rows:
    # the dispatch must fall back to the reference otherwise.
    packed_ok = m <= cpu.W8A16_PACKED_MAX_ROWS and not (dtype == torch.bfloat16 and k % 16)
    assert name == ("cpu_int8pack" if packed_ok else "reference")
    out = fn(x, w, ws, b)
    ref = reference.w8a16_linear(x, w, ws, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert sqnr_db(ref.float(), out.float()) > (60 if dtype == torch.float32 else 35)


def test_w8a16_large_m_uses_reference_and_3d_inputs_work():
    x, _, w, ws, _b = _operands(64, 64, 32, torch.float32, False)
    assert kernels.select("w8a16", x, w)[0] == "reference"
    x3 = x.reshape(4, 16, 64)
    assert kernels.w8a16_linear(x3, w, ws).shape == (4, 16, 32)
    assert kernels.w8a8_linear(x3, w, ws).shape == (4, 16, 32)


def test_force_backend_pins_reference(monkeypatch):
    x, _, w, _ws, _b = _operands(2, 64, 32, torch.float32, False)
    with kernels.force_backend("reference"):
        assert kernels.select("w8a8", x, w)[0] == "reference"
    assert kernels.select("w8a8", x, w)[0] == "cpu_int_mm"
    monkeypatch.setenv("QUANTKIT_KERNELS", "reference")
    assert kernels.select("w8a16", x, w)[0] == "reference"


@pytest.mark.parametrize("op,protocol", [("w8a16", kernels.W8A16Op), ("w8a8", kernels.W8A8Op)])
def test_every_backend_takes_the_op_signature(op, protocol):
    # The op signatures are stated once, by the protocols in quantkit.kernels: every registered
    # implementation, the reference and the dispatch function take those parameters, in that order.
    def params(fn, n):
        return [(p.name, p.kind, p.default) for p in list(inspect.signature(fn).parameters.values())[:n]]

    want = params(protocol.__call__, None)[1:]  # without self
    fns = [impl.fn for impl in kernels.registry._IMPLS[op]] + [
        getattr(reference, f"{op}_linear"),
        getattr(kernels, f"{op}_linear"),
    ]
    assert len(fns) > 2
    for fn in fns:
        assert params(fn, len(want)) == want, fn
