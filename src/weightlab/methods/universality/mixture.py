"""Exact Bayesian mixture learner over a finite hypothesis class (paper key ``universality``).

Feder, Urbanke & Fogel, "The Universality Lens" (arXiv 2506.07661): the learner predicts with the posterior
predictive of a prior ``w`` over a class of models ``p_h(y|x)``,

    q(y_t | x_t, past) = Σ_h w(h | past) p_h(y_t | x_t),        w(h | past) ∝ w(h) Π_{s<t} p_h(y_s | x_s),

and by the chain rule its cumulative log-loss is ``-log q(y^n|x^n) = -log Σ_h w(h) Π_t p_h(y_t|x_t)``.
The regret against a reference model ``h*`` is ``log p_{h*}(y^n|x^n) - log q(y^n|x^n)``; since the sum
contains the term of ``h*``, it never exceeds ``log 1/w(h*)`` (and never exceeds ``log 1/W(A)`` for any set
``A`` of models whose likelihood equals ``h*``'s on the sequence).

Everything runs in log space (``logsumexp``), so classes of millions of hypotheses and long sequences do not
underflow. Large classes are streamed chunk by chunk with :class:`StreamingMixture`.

    mixture = BayesMixture(log_prior)                  # (H,)
    for x_t, y_t in stream:
        loss_t = mixture.update(log_probs_t, y_t)      # log_probs_t: (H, C) = log p_h(·|x_t)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.registry import register


def normalize_log_weights(log_weights: Tensor) -> Tensor:
    """``log_weights - logsumexp(log_weights)``: log weights that sum to one. ``(H,) -> (H,)``."""
    if log_weights.ndim != 1 or log_weights.numel() == 0:
        raise WeightlabError(
            f"log weights must be a non-empty 1-D tensor, got shape {tuple(log_weights.shape)}"
        )
    total = torch.logsumexp(log_weights, dim=0)
    if not torch.isfinite(total):
        raise WeightlabError(
            f"log weights must contain a finite value with total mass > 0, got logsumexp {total}"
        )
    return log_weights - total


def uniform_log_prior(size: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The uniform prior over ``size`` hypotheses, in log space. ``(size,)``."""
    if size < 1:
        raise WeightlabError(f"a hypothesis class needs at least one member, got size {size}")
    return torch.full((size,), -math.log(size), dtype=dtype)


def cumulative_log_marginal(log_lik: Tensor, log_prior: Tensor) -> Tensor:
    """``log q(y^t | x^t)`` for t = 1..n, computed at once from per-step log-likelihoods.

    Args:
        log_lik: ``(n, H)`` with ``log p_h(y_t | x_t)``.
        log_prior: ``(H,)`` log prior (normalized here).

    Returns:
        ``(n,)``: entry ``t-1`` is ``log Σ_h w(h) Π_{s≤t} p_h(y_s|x_s)``; its negative is the mixture's
        cumulative log-loss after ``t`` steps.
    """
    _check_lik(log_lik, log_prior)
    cum = torch.cumsum(log_lik.to(torch.float64), dim=0)  # (n, H)
    return torch.logsumexp(normalize_log_weights(log_prior.to(torch.float64)) + cum, dim=1)


def regret(log_lik: Tensor, log_prior: Tensor, *, reference: int | Tensor) -> Tensor:
    """Cumulative regret ``log p_ref(y^t|x^t) - log q(y^t|x^t)`` for t = 1..n.

    Args:
        log_lik: ``(n, H)`` per-step log-likelihoods of every hypothesis.
        log_prior: ``(H,)``.
        reference: index of the reference (true) hypothesis, or its own ``(n,)`` per-step log-likelihoods
            (the data-generating model need not be in the class).

    Returns:
        ``(n,)`` cumulative regret.
    """
    if isinstance(reference, int):
        if not 0 <= reference < log_lik.shape[1]:
            raise WeightlabError(
                f"reference index {reference} is outside the class of size {log_lik.shape[1]}"
            )
        ref = log_lik[:, reference]
    else:
        ref = reference
        if ref.shape != log_lik.shape[:1]:
            raise WeightlabError(
                f"reference log-likelihoods need shape ({log_lik.shape[0]},), got {tuple(ref.shape)}"
            )
    return torch.cumsum(ref.to(torch.float64), dim=0) - cumulative_log_marginal(log_lik, log_prior)


def _check_lik(log_lik: Tensor, log_prior: Tensor) -> None:
    if log_lik.ndim != 2 or log_lik.shape[1] != log_prior.shape[0]:
        raise WeightlabError(
            f"log-likelihoods need shape (n, H) with H = {log_prior.shape[0]} hypotheses, "
            f"got {tuple(log_lik.shape)}"
        )


@register("method", "universality")
class BayesMixture:
    """Sequential Bayes over a finite class, one observation at a time (log space).

    Args:
        log_prior: ``(H,)`` log prior weights (normalized on construction; ``-inf`` entries have no mass).
    """

    def __init__(self, log_prior: Tensor) -> None:
        self.log_posterior = normalize_log_weights(log_prior.to(torch.float64))  # (H,)
        self.cumulative_loss = 0.0
        self.steps = 0

    def predict_log_proba(self, log_probs: Tensor) -> Tensor:
        """Posterior predictive ``log q(·|x_t)`` from each ``log p_h(·|x_t)``. ``(H, C) -> (C,)``."""
        if log_probs.ndim != 2 or log_probs.shape[0] != self.log_posterior.shape[0]:
            raise WeightlabError(
                f"log_probs need shape (H, C) with H = {self.log_posterior.shape[0]}, "
                f"got {tuple(log_probs.shape)}"
            )
        return torch.logsumexp(self.log_posterior[:, None] + log_probs.to(torch.float64), dim=0)

    def update(self, log_probs: Tensor, y: int) -> float:
        """Predict, pay the log-loss ``-log q(y|x_t)``, then condition on ``y``. Returns that loss (nats)."""
        if not 0 <= y < log_probs.shape[-1]:
            raise WeightlabError(f"label {y} is outside 0..{log_probs.shape[-1] - 1}")
        loss = -float(self.predict_log_proba(log_probs)[y])
        self.log_posterior = normalize_log_weights(self.log_posterior + log_probs[:, y].to(torch.float64))
        self.cumulative_loss += loss
        self.steps += 1
        return loss


@register("method", "streaming-mixture")
class StreamingMixture:
    """``log q(y^t|x^t)`` for a class too large to hold at once, accumulated over chunks of hypotheses.

    Feed ``(log_lik_chunk (n, h), log_prior_chunk (h,))`` pairs with *unnormalized* log prior weights that
    share one scale (e.g. all ``0`` for a uniform prior); :attr:`log_marginal` normalizes by the total.
    """

    def __init__(self) -> None:
        self._joint: Tensor | None = None  # (n,) log Σ_h w̃(h) Π p_h
        self._mass: Tensor | None = None  # () log Σ_h w̃(h)

    def add(self, log_lik: Tensor, log_prior: Tensor) -> None:
        _check_lik(log_lik, log_prior)
        lp = log_prior.to(torch.float64)
        joint = torch.logsumexp(lp + torch.cumsum(log_lik.to(torch.float64), dim=0), dim=1)  # (n,)
        mass = torch.logsumexp(lp, dim=0)
        if self._joint is None:
            self._joint, self._mass = joint, mass
        else:
            if joint.shape != self._joint.shape:
                raise WeightlabError(
                    f"chunk covers {joint.shape[0]} steps, earlier chunks {self._joint.shape[0]}"
                )
            self._joint, self._mass = torch.logaddexp(self._joint, joint), torch.logaddexp(self._mass, mass)

    @property
    def log_marginal(self) -> Tensor:
        """``(n,)`` cumulative ``log q(y^t|x^t)``."""
        if self._joint is None or self._mass is None:
            raise WeightlabError("StreamingMixture has no hypotheses yet: call add() first")
        return self._joint - self._mass
