"""Statistical weight quantization (StatsQ; paper key ``ofq``, Liu, Liu & Cheng, ICML 2023).

The scale is not learned: ``s = 2·mean|W|`` per output row, recomputed (and detached) in every forward.
With ``n = 2^(b−1)`` the integer code of a weight is ``k = floor(clamp(W/s, −1, 1−1e−6)·n) ∈ {−n, …, n−1}``
and its value ``s·(k + 0.5)/n``: ``2^b`` zero-free symmetric levels (at 2 bits ±0.5 and ±1.5 × mean|W|).
The straight-through estimator is the identity, also for clipped weights, as in the reference code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from weightlab.methods.quant.lsq import check_bits

CLIP_HIGH = 1 - 1e-6


def statsq_scale(weight: Tensor) -> Tensor:
    """``2·mean|W|`` per output row, detached: ``(out, in, ...)`` → ``(out, 1, ...)``."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return (2 * rows.abs().mean(1)).clamp_min(1e-12).reshape(-1, *([1] * (weight.dim() - 1)))


def statsq_position(weight: Tensor, bits: int, scale: Tensor | None = None) -> Tensor:
    """``clamp(W/s, −1, 1−1e−6)·n``: where each weight lies on the integer grid (thresholds at integers)."""
    n = 2 ** (check_bits(bits) - 1)
    s = statsq_scale(weight) if scale is None else scale
    return (weight.detach() / s).clamp(-1.0, CLIP_HIGH) * n


def statsq_codes(weight: Tensor, bits: int, scale: Tensor | None = None) -> Tensor:
    """Integer codes ``k ∈ {−2^(b−1), …, 2^(b−1)−1}`` (float tensor of ``weight``'s shape)."""
    return statsq_position(weight, bits, scale).floor()


def statsq_dequantize(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Weights ``s·(k + 0.5)/n`` from codes ``k`` and the per-row scale ``s``."""
    return scale * (codes + 0.5) / 2 ** (bits - 1)


def statsq(weight: Tensor, bits: int) -> Tensor:
    """Fake-quantized ``weight`` with an identity straight-through gradient (one autograd node: the same
    numbers as ``quantized + (weight − weight.detach())`` without its three)."""
    return _StatsQ.apply(weight, check_bits(bits))


class _StatsQ(torch.autograd.Function):
    """StatsQ's exact levels forward, the identity backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, bits: int) -> Tensor:
        # statsq_dequantize(statsq_codes(weight, bits, s), s, bits) with the temporaries reused in place
        scale = statsq_scale(weight)
        n = 2 ** (bits - 1)
        codes = (weight / scale).clamp_(-1.0, CLIP_HIGH).mul_(n).floor_()
        return codes.add_(0.5).mul_(scale).div_(n)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class StatsQuantizer(nn.Module):
    """StatsQ for a weight with rows as output channels. It has no parameters."""

    offset = 0.5  # dequantized weight = scale · (code + offset), with scale = s/n

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)

    def forward(self, weight: Tensor) -> Tensor:
        return statsq(weight, self.bits)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes and the per-row scale ``s/n`` with ``weight ≈ scale·(codes + offset)``."""
        s = statsq_scale(weight)
        return statsq_codes(weight, self.bits, s), s / 2 ** (self.bits - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
