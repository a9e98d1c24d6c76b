import pytest
import torch
from transformers.pytorch_utils import Conv1D

from quantkit.core.modules import W8A8Linear, W8A16Linear
from quantkit.core.smoothquant import smoothing_scale
from quantkit.qmath import sqnr_db


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(96, 48, bias=True)


def test_w8a16_linear_close_to_float(linear):
    x = torch.randn(4, 7, 96)
    q = W8A16Linear.from_float(linear)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    # 8-bit per-channel RTN of Gaussian weights: ~38-40 dB
    assert sqnr_db(linear(x), q(x)) > 35


def test_w8a8_linear_close_to_float(linear):
    x = torch.randn(4, 7, 96)
    q = W8A8Linear.from_float(linear)
    assert q.smooth_inv is None and q.input_scale is None
    assert sqnr_db(linear(x), q(x)) > 28


def test_w8a8_pre_scale_and_static_scale_are_used(linear):
    x = torch.randn(5, 96)
    x[:, 3] *= 100  # an outlier channel, as in LLM activations
    s = smoothing_scale(x.abs().amax(dim=0), linear.weight.detach().abs().amax(dim=0), alpha=0.5)
    smoothed_w = linear.weight.detach() * s
    q = W8A8Linear.from_float(linear, smoothed_w, smooth_inv=1 / s)
    naive = W8A8Linear.from_float(linear)
    ref = linear(x)
    assert sqnr_db(ref, q(x)) > sqnr_db(ref, naive(x)) + 3  # smoothing must help on an outlier channel
    static = W8A8Linear.from_float(linear, input_scale=x.abs().max() / 127)
    assert static.input_scale.shape == ()
    assert sqnr_db(ref, static(x)) > 15


def test_conv1d_is_read_transposed():
    torch.manual_seed(0)
    conv = Conv1D(48, 96)  # nf=48 outputs, nx=96 inputs; weight [96, 48]
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(3, 96)
    for cls in (W8A16Linear, W8A8Linear):
        q = cls.from_float(conv)
        assert q.weight.shape == (48, 96)
        assert sqnr_db(conv(x), q(x)) > 28
