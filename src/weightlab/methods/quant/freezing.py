"""Iterative weight freezing (Nagel et al. 2022, *Overcoming Oscillations in QAT*), the oscillation baseline
of paper key ``ofq``.

A weight whose oscillation frequency (the :class:`~.oscillation.OscillationTracker`'s EMA of flip-backs)
exceeds a threshold is frozen for the rest of training at ``round(EMA of its integer code)``. The threshold
is annealed with a cosine from ``threshold`` to ``final_threshold`` (Qualcomm's recipe: 0.1 → 0.01–0.011).
Here the freeze acts on the latent weight of every :class:`~.layers.QuantLinear`: its gradient is zeroed and,
after each optimizer step, it is set to ``scale·(code + offset)``, the centre of the frozen code's bin under
the current scale (so an LSQ code stays exactly fixed while its step keeps learning; a StatsQ scale is
recomputed from the row, so there the code is held to within that drift). The query–key product of QKR has
no latent weight of its own and is not frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.quant.layers import QuantLinear
from weightlab.methods.quant.oscillation import OscillationTracker
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


@dataclass(frozen=True)
class FreezingConfig:
    """The freezing threshold's schedule (Nagel et al. 2022; Qualcomm's MobileNetV2 recipe 0.1 → 0.01).

    Args:
        threshold: the threshold at the first step.
        final_threshold: the threshold after ``anneal_steps`` (cosine in between).
        anneal_steps: optimizer steps (counted by the callback over all its ``train()`` calls) of the
            annealing; None anneals over each ``train()`` call's own steps.
    """

    threshold: float = 0.1
    final_threshold: float = 0.01
    anneal_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "final_threshold"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise WeightlabError(f"freezing {name} must be in (0, 1), got {value}")
        if self.anneal_steps is not None and self.anneal_steps < 1:
            raise WeightlabError(f"freezing anneal_steps must be ≥ 1 or None, got {self.anneal_steps}")


def freezing_threshold(config: FreezingConfig, progress: float) -> float:
    """The threshold at ``progress ∈ [0, 1]`` of the annealing (clamped): cosine from start to final."""
    p = min(max(progress, 0.0), 1.0)
    return config.final_threshold + 0.5 * (config.threshold - config.final_threshold) * (1 + math.cos(math.pi * p))


@register("method", "iterative-freezing")
class IterativeFreezing(Callback):
    """Callback: freezes the oscillating weights of the ``QuantLinear`` layers ``tracker`` follows.

    Pass it **before** the tracker in ``callbacks`` (it restores the frozen codes before the tracker reads
    them; it raises if the tracker ran first). ``frozen_fraction`` records the frozen share after each step.
    """

    def __init__(self, tracker: OscillationTracker, config: FreezingConfig = FreezingConfig()) -> None:
        self.tracker = tracker
        self.config = config
        self.layers = {n: m for n, m in tracker.modules.items() if isinstance(m, QuantLinear)}
        if not self.layers:
            raise WeightlabError("iterative freezing needs QuantLinear layers among the tracked modules "
                                 f"(tracked: {', '.join(tracker.modules) or 'none'})")
        self.frozen = {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in self.layers.items()}
        self.frozen_codes = {n: torch.zeros_like(m.weight) for n, m in self.layers.items()}
        self.steps = 0
        self.frozen_fraction: list[float] = []
        self._tracker_steps = -1

    def threshold(self, state: LoopState) -> float:
        """The threshold at this step (over ``anneal_steps`` of the callback, or over the train call)."""
        if self.config.anneal_steps is None:
            return freezing_threshold(self.config, state.step / max(state.total_steps - 1, 1))
        return freezing_threshold(self.config, self.steps / max(self.config.anneal_steps - 1, 1))

    @torch.no_grad()
    def after_backward(self, state: LoopState) -> None:
        limit = self.threshold(state)
        for name, layer in self.layers.items():
            track = self.tracker.tracks.get(name)
            if track is not None:
                new = (track.ema > limit) & ~self.frozen[name]
                self.frozen_codes[name] = torch.where(new, track.code_ema.round(), self.frozen_codes[name])
                self.frozen[name] |= new
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(self.frozen[name], 0.0)
        self._tracker_steps = self.tracker.steps

    @torch.no_grad()
    def after_step(self, state: LoopState) -> None:
        if self.tracker.steps != self._tracker_steps:
            raise WeightlabError("IterativeFreezing must come before its OscillationTracker in callbacks")
        self.steps += 1
        frozen = total = 0
        for name, layer in self.layers.items():
            mask = self.frozen[name]
            if mask.any():
                layer.weight.copy_(torch.where(mask, self._value(layer, self.frozen_codes[name]), layer.weight))
            frozen += int(mask.sum())
            total += mask.numel()
        self.frozen_fraction.append(frozen / max(total, 1))

    @staticmethod
    def _value(layer: QuantLinear, codes: Tensor) -> Tensor:
        """The latent weight at the centre of each code's bin under the current scale ``(out, in)``."""
        quantizer = layer.weight_quantizer
        _, scale = quantizer.codes(layer.weight)
        return scale * (codes + quantizer.offset)
