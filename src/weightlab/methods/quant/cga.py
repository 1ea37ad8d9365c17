"""Confidence-guided annealing (CGA; paper key ``ofq``, Liu, Liu & Cheng, ICML 2023).

After QAT has converged, training continues at a small constant learning rate, and in every step only the
weights whose position on the StatsQ grid lies within ``BR`` (boundary range, in integer units) of a rounding
threshold stay trainable; all others are "confident" and frozen (gradient zeroed, value restored after the
optimizer step, which also undoes weight decay and momentum drift). The mask is recomputed every step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant.layers import QuantLinear
from weightlab.methods.quant.statsq import StatsQuantizer, statsq_position
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import LoopState, TrainConfig


def cga_trainable_mask(weight: Tensor, bits: int, boundary_range: float) -> Tensor:
    """Bool mask of the weights within ``boundary_range`` of a StatsQ threshold between two levels.

    With ``x = clamp(W/s, −1, 1−1e−6)·2^(b−1)`` the thresholds are the integers ``−n < j < n``; a weight is
    trainable iff ``|x − j| ≤ BR`` for one of them.
    """
    n = 2 ** (bits - 1)
    position = statsq_position(weight, bits)
    nearest = position.round()
    return ((position - nearest).abs() <= boundary_range) & (nearest.abs() < n)


@dataclass(frozen=True)
class CGAConfig:
    """CGA's boundary range and phase (paper defaults: BR 0.005, 30 epochs at the constant min LR 1e-5)."""

    boundary_range: float = 0.005
    epochs: int = 30
    lr: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.boundary_range <= 0.5:
            raise WeightlabError(f"CGA boundary_range must be in (0, 0.5], got {self.boundary_range}")
        if self.epochs < 1:
            raise WeightlabError(f"CGA epochs must be ≥ 1, got {self.epochs}")
        if not self.lr > 0:
            raise WeightlabError(f"CGA lr must be > 0, got {self.lr}")


def cga_train_config(base: TrainConfig, config: CGAConfig) -> TrainConfig:
    """The CGA phase's schedule: ``base`` with ``config.epochs`` epochs at the constant ``config.lr``."""
    return dataclasses.replace(base, epochs=config.epochs, lr=config.lr, schedule="constant", warmup_steps=0,
                               max_steps=None, description=f"{base.description} CGA")


@register("method", "cga")
class ConfidenceGuidedAnnealing(Callback):
    """Callback: freezes the confident weights of every StatsQ :class:`~.layers.QuantLinear` in each step.

    Under QKR these are ``v``, ``proj``, ``fc1`` and ``fc2`` (``W_q``, ``W_k`` are not frozen, as in the
    reference); without QKR also ``qkv``. ``trainable_fraction`` records the trainable share per step.
    """

    def __init__(self, model: nn.Module, config: CGAConfig = CGAConfig()) -> None:
        self.config = config
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, StatsQuantizer)}
        if not self.layers:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise WeightlabError("CGA needs StatsQ-quantized layers (prepare with method='statsq'); "
                                 f"{type(model).__name__} has none (found: {', '.join(kinds)})")
        self._frozen: dict[str, tuple[Tensor, Tensor]] = {}
        self.trainable_fraction: list[float] = []

    @torch.no_grad()
    def after_backward(self, state: LoopState) -> None:
        trainable = total = 0
        for name, layer in self.layers.items():
            weight = layer.weight
            frozen = ~cga_trainable_mask(weight, layer.bits, self.config.boundary_range)
            if weight.grad is not None:
                weight.grad.masked_fill_(frozen, 0.0)
            self._frozen[name] = (frozen, weight.detach().clone())
            trainable += int((~frozen).sum())
            total += frozen.numel()
        self.trainable_fraction.append(trainable / max(total, 1))

    @torch.no_grad()
    def after_step(self, state: LoopState) -> None:
        for name, (frozen, saved) in self._frozen.items():
            weight = self.layers[name].weight
            weight.copy_(torch.where(frozen, saved, weight))
        self._frozen.clear()
