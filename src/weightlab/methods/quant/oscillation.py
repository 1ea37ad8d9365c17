"""Weight-oscillation tracking during QAT (Nagel et al. 2022, as measured in paper key ``ofq``).

A weight *oscillates* at a step when its integer code changes in the direction opposite to its previous
change (a flip back). Its oscillation frequency is an EMA with momentum ``m = 0.01``:
``ema ← m·oscillated + (1 − m)·ema``. A weight counts as oscillating when ``ema > threshold``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


def oscillation_step(prev_codes: Tensor, codes: Tensor, prev_direction: Tensor, ema: Tensor, *,
                     momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """One tracker update over same-shaped tensors.

    Returns:
        ``(direction, ema, oscillated)``: the direction of each weight's latest change (−1, 0 before any
        change, +1), the updated EMA, and a bool mask of the weights that flipped back at this step.
    """
    step_direction = torch.sign(codes - prev_codes)
    oscillated = step_direction * prev_direction < 0
    ema = momentum * oscillated.float() + (1 - momentum) * ema
    direction = torch.where(step_direction != 0, step_direction, prev_direction)
    return direction, ema, oscillated


@dataclass(frozen=True)
class OscillationConfig:
    """How oscillation is measured (Nagel et al. 2022's momentum 0.01; threshold 0.005 as in ``ofq``).

    Args:
        momentum: ``m`` of the oscillation-frequency EMA.
        threshold: a weight oscillates when its EMA exceeds this.
        record_every: append to ``history`` every this many steps.
        skip: ``fnmatch`` patterns of module names not to track (e.g. an 8-bit ``head``).
    """

    momentum: float = 0.01
    threshold: float = 0.005
    record_every: int = 1
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.momentum <= 1:
            raise WeightlabError(f"oscillation momentum must be in (0, 1], got {self.momentum}")
        if not 0 <= self.threshold < 1:
            raise WeightlabError(f"oscillation threshold must be in [0, 1), got {self.threshold}")
        if self.record_every < 1:
            raise WeightlabError(f"oscillation record_every must be ≥ 1, got {self.record_every}")


@dataclass
class _Track:
    codes: Tensor
    direction: Tensor
    ema: Tensor


@register("method", "oscillation-tracker")
class OscillationTracker(Callback):
    """Callback: tracks the integer codes of every quantized weight of ``model`` after each optimizer step.

    The codes are first read when the tracker is built, and read again at the start of the first
    :func:`~weightlab.train.train` call if no step has been tracked yet; in a loop of your own, build it
    before the first step and call ``after_step(None)`` after every ``optimizer.step()``. It keeps its state
    across several ``train`` calls (e.g. QAT then CGA).
    ``history`` holds ``(step, fraction oscillating, fraction of codes changed)`` every
    ``config.record_every`` steps.
    """

    def __init__(self, model: nn.Module, config: OscillationConfig = OscillationConfig()) -> None:
        self.modules = {n: m for n, m in model.named_modules() if hasattr(m, "integer_codes")
                        and not any(fnmatch.fnmatchcase(n, p) for p in config.skip)}
        if not self.modules:
            raise WeightlabError(f"{type(model).__name__} has no quantized layers to track; "
                                 "call prepare() first")
        self.config = config
        self.tracks: dict[str, _Track] = {}
        self.steps = 0
        self.flips = 0
        self.oscillations = 0
        self.history: list[tuple[int, float, float]] = []
        self._snapshot()

    def _snapshot(self, *, refresh: bool = False) -> None:
        """Read the current codes of the modules not tracked yet (of all of them with ``refresh``)."""
        for name, module in self.modules.items():
            if refresh or name not in self.tracks:
                codes = module.integer_codes()
                self.tracks[name] = _Track(codes, torch.zeros_like(codes), torch.zeros_like(codes))

    def on_experience_start(self, state: LoopState) -> None:
        self._snapshot(refresh=self.steps == 0)

    def after_step(self, state: LoopState | None) -> None:
        self.steps += 1
        changed = 0
        self._snapshot()
        for name, module in self.modules.items():
            track = self.tracks[name]
            codes = module.integer_codes()
            changed += int((codes != track.codes).sum())
            track.direction, track.ema, oscillated = oscillation_step(
                track.codes, codes, track.direction, track.ema, momentum=self.config.momentum)
            track.codes = codes
            self.oscillations += int(oscillated.sum())
        self.flips += changed
        if self.steps % self.config.record_every == 0:
            self.history.append((self.steps, self.oscillating_fraction(), changed / self.num_weights()))

    def num_weights(self) -> int:
        return sum(t.codes.numel() for t in self.tracks.values())

    def oscillating_fraction(self) -> float:
        """Fraction of tracked weights whose oscillation EMA exceeds the threshold."""
        if not self.tracks:
            return 0.0
        return sum(int((t.ema > self.config.threshold).sum()) for t in self.tracks.values()) / self.num_weights()

    def mean_frequency(self) -> float:
        """Mean oscillation EMA over all tracked weights (threshold-free)."""
        if not self.tracks:
            return 0.0
        return sum(float(t.ema.sum()) for t in self.tracks.values()) / self.num_weights()
