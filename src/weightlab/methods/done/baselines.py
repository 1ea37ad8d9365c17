"""DONE's instance-reweighted AT baselines: GAIRAT and MAIL (paper key ``done``, its comparison methods).

Both are callbacks on the same reweighted-AT loop as :class:`~weightlab.methods.done.dro.DONE`: adversarial
examples from PGD, per-sample weights through the loop's ``sample_weights`` hook (normalised to sum to 1, so
the loss is ``Σ w_i ℓ_i``), plain AT (uniform weights) during a burn-in at the start of training.

- **GAIRAT** (Zhang et al., ICLR 2021, "Geometry-aware instance-reweighted adversarial training"): κ_i, the
  number of the K PGD iterates still classified correctly, measures how far a sample is from the decision
  boundary; ``w_i ∝ (1 + tanh(λ + 5·(1 − 2κ_i/K))) / 2``, so samples attacked early (small κ) weigh most.
- **MAIL** (Wang, Liu et al., NeurIPS 2021, "Probabilistic margins for instance reweighting in adversarial
  training"): the probability margin of the adversarial example ``PM_i = p_y − max_{j≠y} p_j`` (softmax of
  the training logits), and ``w_i ∝ sigmoid(−γ·(PM_i − β))``: small or negative margins weigh most.

    train(model, data, cfg, callbacks=[GAIRAT(PGD(eps=0.1, steps=3), GAIRATConfig(lam=-1.0))])
    train(model, data, cfg, callbacks=[MAIL(PGD(eps=0.1, steps=3), MAILConfig(gamma=1.0, beta=-1.5))])

Defaults: GAIRAT's λ = −1 and reweighting after the first half of training, as far as known here; MAIL's are
those of its code (``QizhouWang/MAIL``: slope 1, bias −1.5, reweighting from epoch 75 of 120). One difference
from MAIL's code: it scales the raw weights by a constant 3 instead of normalising them per batch; here both
methods normalise, as DONE's weights are, so no method changes the mean step size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.adversarial.mart import largest_wrong_probability
from weightlab.methods.done.dro import effective_sample_size
from weightlab.methods.done.implicit import BarrierPGD
from weightlab.registry import register

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


def gairat_weights(kappa: Tensor, steps: int, lam: float) -> Tensor:
    """GAIRAT's weights ``(1 + tanh(λ + 5(1 − 2κ/K)))/2`` normalised to sum to 1 ``(B,)`` of κ ``(B,)``."""
    if steps < 1:
        raise WeightlabError(f"GAIRAT needs K ≥ 1 attack steps, got {steps}")
    raw = (1 + torch.tanh(lam + 5 * (1 - 2 * kappa.double() / steps))) / 2  # (B,)
    return (raw / raw.sum()).float()


def probability_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``p_y − max_{j≠y} p_j`` per sample ``(B,)`` of logits ``(B, C)`` and labels ``(B,)``."""
    probs = torch.softmax(logits.detach().float(), dim=1)  # (B, C)
    return probs.gather(1, y.view(-1, 1)).squeeze(1) - largest_wrong_probability(probs, y)


def mail_weights(margin: Tensor, gamma: float, beta: float) -> Tensor:
    """MAIL's weights ``sigmoid(−γ(PM − β))`` normalised to sum to 1 ``(B,)`` of margins ``(B,)``."""
    raw = torch.sigmoid(-gamma * (margin.double() - beta))  # (B,)
    return (raw / raw.sum()).float()


def _check_burn_in(burn_in: float) -> None:
    if not 0 <= burn_in < 1:
        raise WeightlabError(f"burn_in must be a fraction of training in [0, 1), got {burn_in}")


def _burning_in(state: LoopState, burn_in: float) -> bool:
    """Whether this step lies in the first ``burn_in`` fraction of training (plain AT there)."""
    return state.step < burn_in * state.total_steps


class _RecordsESS:
    """Mixin: records the effective sample size of every reweighted batch (``diagnostics``), as DONE does."""

    ess: list[float]  # per reweighted batch: effective sample size / batch size

    def _record(self, weights: Tensor) -> Tensor:
        self.ess.append(effective_sample_size(weights) / weights.numel())
        return weights

    def diagnostics(self) -> dict[str, float]:
        """Median effective sample size (fraction of the batch) over the reweighted batches (NaN before)."""
        return {"ess_fraction_median": float(torch.tensor(self.ess).median()) if self.ess else math.nan}


@dataclass(frozen=True)
class GAIRATConfig:
    """GAIRAT settings (Zhang et al. 2021).

    Args:
        lam: λ, the weight curve's offset (the authors' default −1; larger λ flattens the weights).
        burn_in: fraction of the training steps that run plain AT before reweighting (theirs: 60 of 120
            epochs).
    """

    lam: float = -1.0
    burn_in: float = 0.5

    def __post_init__(self) -> None:
        if not math.isfinite(self.lam):
            raise WeightlabError(f"GAIRAT lam must be finite, got {self.lam}")
        _check_burn_in(self.burn_in)


@register("method", "gairat")
class GAIRAT(AdversarialTraining, _RecordsESS):
    """Adversarial training with GAIRAT's geometry-aware instance weights (a training callback).

    Args:
        attack: the ℓ∞ PGD attack; κ counts its iterates.
        config: the weight curve and burn-in.
    """

    def __init__(self, attack: PGD = PGD(), config: GAIRATConfig = GAIRATConfig()) -> None:
        if attack.norm != "linf":
            raise WeightlabError(f"GAIRAT counts κ along linf PGD, got an attack with norm {attack.norm!r}")
        super().__init__(BarrierPGD.of(attack, barrier=0.0))
        self.config = config
        self.ess = []
        self._kappa: Tensor | None = None  # (B,) of the current batch

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        attack = self.attack
        assert isinstance(attack, BarrierPGD)
        x_adv, self._kappa = attack.solve(state.model, batch.x, batch.y, generator=state.generator)
        return Batch(x_adv, batch.y, batch.t)

    def sample_weights(self, state: LoopState, batch: Batch, losses: Tensor) -> Tensor | None:
        if _burning_in(state, self.config.burn_in) or self._kappa is None:
            return None
        weights = gairat_weights(self._kappa, self.attack.steps, self.config.lam)
        return self._record(weights).to(losses.device, losses.dtype)


@dataclass(frozen=True)
class MAILConfig:
    """MAIL settings (Wang, Liu et al. 2021).

    Args:
        gamma: γ > 0, the sigmoid's slope (the authors' 1).
        beta: β, the margin at which the raw weight is 1/2 (the authors' bias −1.5).
        burn_in: fraction of the training steps that run plain AT before reweighting (theirs: 75 of 120
            epochs).
    """

    gamma: float = 1.0
    beta: float = -1.5
    burn_in: float = 0.625

    def __post_init__(self) -> None:
        if not self.gamma > 0 or math.isinf(self.gamma):
            raise WeightlabError(f"MAIL gamma must be a finite number > 0, got {self.gamma}")
        if not math.isfinite(self.beta):
            raise WeightlabError(f"MAIL beta must be finite, got {self.beta}")
        _check_burn_in(self.burn_in)


@register("method", "mail")
class MAIL(AdversarialTraining, _RecordsESS):
    """Adversarial training with MAIL's margin-aware instance weights (a training callback).

    The margin is taken from the training forward pass on the adversarial batch (the logits the loss sees).

    Args:
        attack: the PGD attack.
        config: slope, bias and burn-in.
    """

    def __init__(self, attack: PGD = PGD(), config: MAILConfig = MAILConfig()) -> None:
        super().__init__(attack)
        self.config = config
        self.ess = []
        self._margin: Tensor | None = None  # (B,) of the current batch

    def transform_logits(self, state: LoopState, batch: Batch, logits: Tensor) -> Tensor:
        self._margin = probability_margin(logits, batch.y)
        return logits

    def sample_weights(self, state: LoopState, batch: Batch, losses: Tensor) -> Tensor | None:
        if _burning_in(state, self.config.burn_in) or self._margin is None:
            return None
        weights = mail_weights(self._margin, self.config.gamma, self.config.beta)
        return self._record(weights).to(losses.device, losses.dtype)
