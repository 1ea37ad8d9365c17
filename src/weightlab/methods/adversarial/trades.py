"""TRADES (Zhang et al., ICML 2019): adversarial training that trades natural accuracy for robustness through a
KL regulariser. A base of the ``rift`` paper's Table 2.

Inner maximisation: from ``x' = x + 0.001·N(0, 1)``, PGD steps on ``KL(f(x) ‖ f(x'))`` (the clean prediction
held fixed), projected onto the ε-ball and into [0, 1], with the model in eval mode. Outer loss:

    CE(f(x), y) + β · KL(f(x) ‖ f(x'))            (β = 6 in the paper; the KL is the batch mean)

both forward passes in train mode, as in the authors' ``trades.py``.

    train(model, data, cfg, callbacks=[TRADES(PGD(eps=0.1, steps=3), TRADESConfig(beta=6.0))])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, ascent_step, eval_mode
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import default_forward

if TYPE_CHECKING:
    from weightlab.data.arrays import Batch
    from weightlab.train.loop import LoopState


def kl_per_sample(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(logits_p) ‖ softmax(logits_q))`` per sample ``(B,)`` of logits ``(B, C)``."""
    log_p = F.log_softmax(logits_p, dim=1)  # (B, C)
    return (log_p.exp() * (log_p - F.log_softmax(logits_q, dim=1))).sum(1)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0) -> Tensor:
    """The TRADES objective ``mean CE(f(x), y) + β · mean KL(f(x) ‖ f(x'))`` of logits ``(B, C)``."""
    return F.cross_entropy(logits_clean, y) + beta * kl_per_sample(logits_clean, logits_adv).mean()


@dataclass(frozen=True)
class TRADESConfig:
    """TRADES settings (Zhang et al. 2019).

    Args:
        beta: weight of the KL regulariser (6 in the paper; 1 is its accuracy-leaning setting).
        start_std: standard deviation of the Gaussian start of the inner maximisation (0.001).
    """

    beta: float = 6.0
    start_std: float = 0.001

    def __post_init__(self) -> None:
        if not self.beta >= 0 or math.isinf(self.beta):
            raise WeightlabError(f"TRADES beta must be a finite number ≥ 0, got {self.beta}")
        if not self.start_std >= 0:
            raise WeightlabError(f"TRADES start_std must be ≥ 0, got {self.start_std}")


def trades_attack(
    model: nn.Module,
    x: Tensor,
    attack: PGD,
    *,
    start_std: float = 0.001,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES's inner maximisation: adversarial images ``(B, C, H, W)`` that raise ``KL(f(x) ‖ f(x'))``.

    ``attack`` gives the ball (``eps``, ``norm``), ``steps`` and the step size; its objective and random start
    are replaced by the KL and the Gaussian start ``x + start_std·N(0, 1)``. Runs in eval mode.
    """
    x = x.detach()
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            target = model(x)  # (B, C): the clean prediction, held fixed
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        delta = (x + start_std * noise).clamp_(0, 1) - x
        for _ in range(attack.steps):
            delta.requires_grad_(True)
            loss = kl_per_sample(target, model(x + delta)).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = ascent_step(x, delta, grad, attack)
    return (x + delta).clamp_(0, 1).detach()


@register("method", "trades")
class TRADES(Callback):
    """TRADES adversarial training (a training callback): the loop trains on the clean batch, and the loss
    gains ``β · KL(f(x) ‖ f(x'))`` with ``x'`` from :func:`trades_attack`.

    Args:
        attack: the ball, steps and step size of the inner maximisation.
        config: β and the start.
    """

    def __init__(self, attack: PGD = PGD(), config: TRADESConfig = TRADESConfig()) -> None:
        self.attack = attack
        self.config = config
        self._x_adv: Tensor | None = None

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        self._x_adv = trades_attack(state.model, batch.x, self.attack, start_std=self.config.start_std,
                                    generator=state.generator)
        return batch

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        if self._x_adv is None:
            raise WeightlabError("TRADES.loss called before on_batch (no adversarial batch)")
        adv = type(batch)(self._x_adv, batch.y, batch.t)
        self._x_adv = None
        return loss + self.config.beta * kl_per_sample(logits, default_forward(state.model, adv)).mean()
