"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a linear layer ``y = x W^T`` and a positive per-input-channel vector ``s``,
``y = (x / s) (W * s)^T``: the float function is unchanged while the activation range per channel
shrinks by ``s`` and the weight's grows. With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

both sides end up with comparable per-channel ranges, so both quantize well (Xiao et al., 2023).
``max|W_j|`` is over every row of every linear reading that input.

Where a norm feeds the linears, ``1/s`` is folded into the norm's weight (and bias) so it costs
nothing at run time. Elsewhere the ``1/s`` multiply stays in the quantized module (``smooth_inv``).
"""

from __future__ import annotations

import torch

# Keeps s away from 0 and inf when a channel's activation or weight max is (near) zero.
_MIN = 1e-5


def smoothing_scale(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` (fp32 ``[in]``) from activation and weight per-input-channel abs-max."""
    a = act_amax.float().clamp_min(_MIN)
    w = weight_amax.float().clamp_min(_MIN)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(_MIN)
    # A channel that never fired (all-zero activation) or has all-zero weights carries no signal
    # to balance: leave it unscaled rather than blowing up the other side.
    dead = (act_amax <= 0) | (weight_amax <= 0)
    return torch.where(dead, torch.ones_like(s), s)


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the norm's output channels by ``s``: ``(offset + w') = (offset + w) / s``."""
    w = norm.weight
    w.copy_(((w.float() + offset) / s - offset).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
