"""DONE: doubly robust instance-reweighted adversarial training (paper key ``done``; Sow et al., ICLR 2024).

The instance weights solve a KL-regularised DRO problem over the batch's adversarial losses ``ℓ``:

    max_{w ∈ Δ_n} Σ_i w_i ℓ_i − r·KL(w ‖ uniform)   ⇒   w* = softmax(ℓ / r)

so the gradient of the DRO objective ``r·log mean_i exp(ℓ_i / r)`` is ``Σ_i w*_i ∇ℓ_i``: weighted adversarial
training with detached weights (r → ∞ gives plain AT, r → 0 the max loss). The compositional variant (the
paper's CID, without its implicit second-order term) replaces the batch normaliser ``mean_i exp(ℓ_i / r)`` by
an SCGD running estimate ``u_t = (1 − β)·u_{t−1} + β·mean_batch exp(ℓ / r)`` tracked across batches, giving
weights ``exp(ℓ_i / r) / (n·u_t)`` that sum to ≈ 1 only on average: the sum drifts (below 1 while the losses
fall and ``u`` lags), which scales the learning rate. ``step_correction=True`` divides the weights by a
running mean of their sums (same β), so the mean step is the per-batch form's while the batch-to-batch
variation of the compositional estimate is kept. Every batch's weight sum and effective sample size
``(Σw)² / Σw²`` are recorded (:meth:`DONE.diagnostics`). Everything is done in log space.

    train(model, data, cfg, callbacks=[DONE(PGD(eps=0.2, steps=3), DONEConfig(r=1.0))])

The full CID: ``DONEConfig(barrier=μ)`` solves the lower level as the log-barrier-regularised problem (Eq. 7,
projected steps as in Alg. 1; :class:`~weightlab.methods.done.implicit.BarrierPGD`) and ``implicit=True`` adds
the implicit term ``(∂δ*/∂θ)ᵀ ∂F/∂δ`` to the gradient (conjugate gradient on Hessian-vector products; see
:mod:`weightlab.methods.done.implicit`). ``barrier=0`` without ``implicit`` is the PGD lower level above.
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
from weightlab.methods.done.implicit import BarrierPGD, implicit_gradient
from weightlab.registry import register

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


def dro_weights(losses: Tensor, r: float) -> Tensor:
    """KL-DRO weights in closed form: ``softmax(ℓ / r)`` ``(B,)`` of per-sample losses ``(B,)``."""
    if not r > 0:
        raise WeightlabError(f"DRO temperature r must be > 0, got {r}")
    losses = losses.detach().float()
    if math.isinf(r):
        return torch.full_like(losses, 1.0 / losses.numel())
    return torch.softmax(losses / r, dim=0)


def dro_objective(losses: Tensor, r: float) -> Tensor:
    """The DRO value ``r·log mean_i exp(ℓ_i / r)`` (its gradient is ``Σ w*_i ∇ℓ_i``)."""
    return r * (torch.logsumexp(losses / r, dim=0) - math.log(losses.numel()))


class RunningNormaliser:
    """SCGD estimate of ``E[exp(ℓ / r)]`` across batches, kept as ``log u`` (the compositional variant)."""

    def __init__(self, r: float, beta: float) -> None:
        if not 0 < beta <= 1:
            raise WeightlabError(f"normaliser momentum beta must be in (0, 1], got {beta}")
        self.r, self.beta = r, beta
        self.log_u: Tensor | None = None

    def weights(self, losses: Tensor) -> Tensor:
        """Update ``u`` with this batch and return ``exp(ℓ_i / r) / (n·u_t)`` ``(B,)``."""
        scaled = losses.detach().float() / self.r  # (B,)
        log_mean = torch.logsumexp(scaled, 0) - math.log(scaled.numel())
        if self.log_u is None:
            self.log_u = log_mean
        else:
            self.log_u = torch.logaddexp(
                self.log_u + math.log1p(-self.beta) if self.beta < 1 else torch.tensor(-math.inf),
                log_mean + math.log(self.beta),
            )
        return torch.exp(scaled - self.log_u) / scaled.numel()


@dataclass(frozen=True)
class DONEConfig:
    """DONE settings (paper key ``done``).

    Args:
        r: KL-regularisation strength (temperature of the weights); ``inf`` gives uniform weights (plain AT).
        beta: momentum of the running normaliser; None uses the exact per-batch closed form.
        shuffle: a control — the DONE weights of each batch are randomly permuted over its samples, so the
            weight distribution is kept but the link to each sample's loss is cut.
        step_correction: with ``beta``, divide the weights by a running mean (momentum ``beta``) of their
            sums, so the running normaliser does not change the mean learning rate.
        barrier: the log-barrier coefficient μ ≥ 0 of the lower level (0: plain PGD).
        implicit: add the implicit gradient term of CID (∂δ*/∂θ through the lower level's optimality
            condition; needs ``barrier > 0``).
        cg_steps: conjugate-gradient iterations (Hessian-vector products) per batch for the implicit term.
        margin: with a barrier, the ball is shrunk to ``(1 − margin)·ε`` so the barrier stays finite.
    """

    r: float = 1.0
    beta: float | None = None
    shuffle: bool = False
    step_correction: bool = False
    barrier: float = 0.0
    implicit: bool = False
    cg_steps: int = 5
    margin: float = 1e-3

    def __post_init__(self) -> None:
        if not self.r > 0:
            raise WeightlabError(f"DONE r must be > 0 (or inf), got {self.r}")
        if self.beta is not None and not 0 < self.beta <= 1:
            raise WeightlabError(f"DONE beta must be in (0, 1] or None, got {self.beta}")
        if self.step_correction and self.beta is None:
            raise WeightlabError("DONE step_correction needs the running normaliser (a beta in (0, 1])")
        if not self.barrier >= 0 or math.isinf(self.barrier):
            raise WeightlabError(f"DONE barrier must be a finite number ≥ 0, got {self.barrier}")
        if self.implicit and self.barrier == 0:
            raise WeightlabError("DONE implicit needs the barrier lower level: a barrier > 0, got 0 (at μ = 0 the "
                                 "lower level is constrained and has no interior optimality condition)")
        if self.cg_steps < 1:
            raise WeightlabError(f"DONE cg_steps must be ≥ 1, got {self.cg_steps}")
        if not 0 < self.margin < 1:
            raise WeightlabError(f"DONE margin must be in (0, 1), got {self.margin}")


def effective_sample_size(weights: Tensor) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²`` of non-negative weights ``(B,)`` (B for uniform ones)."""
    w = weights.detach().double()
    return float(w.sum() ** 2 / (w * w).sum().clamp_min(1e-300))


@register("method", "done")
class DONE(AdversarialTraining):
    """Adversarial training with KL-DRO instance weights on the adversarial losses (a training callback).

    With ``config.barrier > 0`` or ``config.implicit`` the attack becomes the log-barrier lower level
    (:class:`~weightlab.methods.done.implicit.BarrierPGD` with the attack's settings); with ``implicit`` the
    ``loss`` hook adds the implicit term to the gradient, leaving the loss value as it is.

    Args:
        attack: the attack of :class:`~weightlab.methods.adversarial.AdversarialTraining`.
        config: the DRO settings.
    """

    def __init__(self, attack: PGD = PGD(), config: DONEConfig = DONEConfig()) -> None:
        if config.barrier > 0 or config.implicit:
            attack = BarrierPGD.of(attack, barrier=config.barrier, margin=config.margin)
        super().__init__(attack)
        self.config = config
        self._clean: Tensor | None = None  # implicit: this batch's clean images (B, C, H, W)
        self.normaliser = None if config.beta is None else RunningNormaliser(config.r, config.beta)
        self.mean_sum: float | None = None  # running mean of the weight sums (step_correction)
        self.sums: list[float] = []  # per batch: Σw before any correction
        self.ess: list[float] = []  # per batch: effective sample size / batch size

    def on_experience_start(self, state: LoopState) -> None:
        if self.normaliser is not None:
            self.normaliser.log_u = None
        self.mean_sum = None

    def diagnostics(self) -> dict[str, float]:
        """Median effective sample size (fraction of the batch) and the range of the weight sums over the
        batches seen so far (NaN before the first batch)."""
        if not self.sums:
            return {"ess_fraction_median": math.nan, "weight_sum_min": math.nan, "weight_sum_median": math.nan,
                    "weight_sum_max": math.nan}
        sums = torch.tensor(self.sums)
        return {"ess_fraction_median": float(torch.tensor(self.ess).median()), "weight_sum_min": float(sums.min()),
                "weight_sum_median": float(sums.median()), "weight_sum_max": float(sums.max())}

    def sample_weights(self, state: LoopState, batch: Batch, losses: Tensor) -> Tensor:
        if self.normaliser is None or math.isinf(self.config.r):
            weights = dro_weights(losses, self.config.r)
        else:
            weights = self.normaliser.weights(losses)
        total = float(weights.sum())
        self.sums.append(total)
        self.ess.append(effective_sample_size(weights) / weights.numel())
        if self.config.step_correction:
            beta = self.config.beta or 1.0
            self.mean_sum = total if self.mean_sum is None else (1 - beta) * self.mean_sum + beta * total
            weights = weights / self.mean_sum
        if self.config.shuffle:
            weights = weights[torch.randperm(weights.numel(), generator=state.generator).to(weights.device)]
        return weights.to(losses.dtype)

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        adversarial = super().on_batch(state, batch)
        if not self.config.implicit:
            return adversarial
        self._clean = batch.x
        return Batch(adversarial.x.requires_grad_(True), adversarial.y, adversarial.t)  # for ∂F/∂δ

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        """With ``implicit``, add the implicit term to the gradient (the loss value is unchanged)."""
        if not self.config.implicit or self._clean is None:
            return loss
        (upper,) = torch.autograd.grad(loss, batch.x, retain_graph=True)  # ∂F/∂δ (B, C, H, W)
        attack = self.attack
        assert isinstance(attack, BarrierPGD)
        terms = implicit_gradient(state.model, self._clean, batch.y, batch.x.detach() - self._clean, upper,
                                  eps=attack.eps, barrier=attack.barrier, radius=attack.radius,
                                  cg_steps=self.config.cg_steps)
        params = [p for p in state.model.parameters() if p.requires_grad]
        surrogate = sum((p * g).sum() for p, g in zip(params, terms, strict=True))  # gradient: the terms
        self._clean = None
        return loss + (surrogate - surrogate.detach())
