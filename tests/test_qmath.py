import torch

from quantkit.qmath import QMAX, dequantize, quantize_per_token, quantize_weight_per_channel, sqnr_db


def test_weight_per_channel_roundtrip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different ranges
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert q.abs().max() <= QMAX
    # every row's abs-max maps exactly onto +-127
    assert torch.equal(q.abs().amax(dim=1), torch.full((37,), QMAX, dtype=torch.int8))
    err = (dequantize(q, scale[:, None]) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_zero_rows_and_tokens_quantize_to_zero():
    q, scale = quantize_weight_per_channel(torch.zeros(3, 8))
    assert (q == 0).all() and (scale > 0).all()
    q, scale = quantize_per_token(torch.zeros(2, 4, 8))
    assert (q == 0).all() and scale.shape == (2, 4, 1)


def test_per_token_scales_follow_each_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 50.0, -25.0]])
    q, scale = quantize_per_token(x)
    assert torch.allclose(scale[:, 0], torch.tensor([2.0, 100.0]) / QMAX)
    assert q[0, 1] == -QMAX and q[1, 0] == QMAX


def test_sqnr_db():
    x = torch.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-4  # noise = 0.1 amplitude -> 20 dB
