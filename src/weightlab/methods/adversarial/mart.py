"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training. A base of the ``rift`` paper's
Table 2.

The inner maximisation is PGD on the cross-entropy (:class:`~weightlab.methods.adversarial.PGD`). The outer
loss on the adversarial example ``x'`` and the clean ``x`` (``p = softmax(f(x))``, ``p' = softmax(f(x'))``):

    BCE(p', y) + λ · KL(p ‖ p') · (1 − p_y)        (λ = 6 in the paper; both terms are batch means)
    BCE(p', y) = −log p'_y − log(1 − max_{k≠y} p'_k)

so misclassified clean examples (small ``p_y``) weigh more in the KL term. Both forward passes run in train
mode and no term is detached, as in the authors' ``mart.py``.

    train(model, data, cfg, callbacks=[MART(PGD(eps=0.1, steps=3), MARTConfig(lam=6.0))])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.adversarial.trades import kl_per_sample
from weightlab.registry import register
from weightlab.train.loop import default_forward

if TYPE_CHECKING:
    from weightlab.data.arrays import Batch
    from weightlab.train.loop import LoopState


def largest_wrong_probability(probs: Tensor, y: Tensor) -> Tensor:
    """``max_{k≠y} p_k`` per sample ``(B,)`` of probabilities ``(B, C)`` and labels ``(B,)``."""
    return probs.scatter(1, y.view(-1, 1), float("-inf")).max(1).values  # the true class never wins the max


def margin_term(logits_adv: Tensor, y: Tensor) -> Tensor:
    """``−log(1 − max_{k≠y} p'_k)`` per sample ``(B,)``: the boosted part of MART's BCE."""
    probs = F.softmax(logits_adv, dim=1)  # (B, C)
    return -torch.log((1 - largest_wrong_probability(probs, y)).clamp_min(1e-12))


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, lam: float = 6.0) -> Tensor:
    """The MART objective of clean and adversarial logits ``(B, C)`` and labels ``(B,)`` (a scalar)."""
    bce = F.cross_entropy(logits_adv, y) + margin_term(logits_adv, y).mean()
    return bce + lam * _weighted_kl(logits_clean, logits_adv, y)


def _weighted_kl(logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """``mean KL(p ‖ p') · (1 − p_y)``: MART's misclassification-aware regulariser."""
    p_true = F.softmax(logits_clean, dim=1).gather(1, y.view(-1, 1)).squeeze(1)  # (B,)
    return (kl_per_sample(logits_clean, logits_adv) * (1 - p_true)).mean()


@dataclass(frozen=True)
class MARTConfig:
    """MART settings (Wang et al. 2020).

    Args:
        lam: weight λ of the misclassification-aware KL term (6 in the paper).
    """

    lam: float = 6.0

    def __post_init__(self) -> None:
        if not self.lam >= 0 or math.isinf(self.lam):
            raise WeightlabError(f"MART lam must be a finite number ≥ 0, got {self.lam}")


@register("method", "mart")
class MART(AdversarialTraining):
    """MART adversarial training (a training callback): the loop trains on the PGD examples (its loss is the
    cross-entropy on ``x'``), and the loss gains MART's margin term and its weighted KL to the clean batch.

    Args:
        attack: the PGD attack of the inner maximisation.
        config: λ.
    """

    def __init__(self, attack: PGD = PGD(), config: MARTConfig = MARTConfig()) -> None:
        super().__init__(attack)
        self.config = config
        self._clean: Batch | None = None

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        self._clean = batch
        return super().on_batch(state, batch)

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        if self._clean is None:
            raise WeightlabError("MART.loss called before on_batch (no clean batch)")
        clean, self._clean = self._clean, None
        logits_clean = default_forward(state.model, clean)
        return (loss + margin_term(logits, batch.y).mean()
                + self.config.lam * _weighted_kl(logits_clean, logits, batch.y))
