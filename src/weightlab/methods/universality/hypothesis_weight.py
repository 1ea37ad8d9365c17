"""The "weight of the hypothesis" ``W(A_ε)`` and the regret bound built from it (paper key ``universality``).

``A_ε = {θ : E_x KL(p_θ*(·|x) ‖ p_θ(·|x)) ≤ ε}`` is the set of models within KL distance ε of the truth and
``W(A_ε)`` its prior mass. For the Bayesian mixture learner (:mod:`weightlab.methods.universality.mixture`)

    E[regret_n] ≤ min_ε  n ε + log 1/W(A_ε)                                   (index of resolvability)

(Jensen on ``q(y^n) ≥ ∫_A w(θ) p_θ(y^n)``; see ``docs/universality.md`` for the derivation and what was
checked against the paper). Two estimates of ``W``:

- **Monte Carlo / enumeration**: the prior-weighted share of hypotheses with divergence ≤ ε
  (:func:`log_weight`), from prior samples or from an enumerated finite class.
- **Laplace (flat minimum)**: ``A_ε ≈ {δ : ½ δᵀ F δ ≤ ε}``, an ellipsoid, so
  ``log 1/W ≈ -log w(θ*) + ½ Σ_i log λ_i - (d/2) log 2ε - log V_d`` over the Fisher eigenvalues λ_i above a
  tolerance (flat directions cost nothing) — :func:`laplace_log_inv_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.universality.mixture import normalize_log_weights, uniform_log_prior


def expected_divergence(log_p_true: Tensor, log_p: Tensor) -> Tensor:
    """``E_x KL(p_true(·|x) ‖ p_h(·|x))`` averaged over the M inputs, for every hypothesis h.

    Args:
        log_p_true: ``(M, C)`` log-probabilities of the true model at M inputs.
        log_p: ``(H, M, C)`` log-probabilities of H hypotheses at the same inputs.

    Returns:
        ``(H,)`` mean KL in nats (≥ 0).
    """
    if log_p.ndim != 3 or log_p.shape[1:] != log_p_true.shape:
        raise WeightlabError(
            f"log_p needs shape (H, {', '.join(map(str, log_p_true.shape))}), got {tuple(log_p.shape)}"
        )
    p = log_p_true.exp()
    kl = (p * (log_p_true - log_p)).sum(-1)  # (H, M)
    return kl.mean(-1).clamp_min(0.0)


def log_weight(divergences: Tensor, eps: Tensor, *, log_prior: Tensor | None = None) -> Tensor:
    """``log W(A_ε)`` for each ε: the log prior mass of hypotheses with divergence ≤ ε.

    Args:
        divergences: ``(S,)`` divergence of each hypothesis from the truth.
        eps: ``(E,)`` radii.
        log_prior: ``(S,)`` log prior weights of an enumerated class (normalized here); ``None`` means the
            hypotheses are i.i.d. draws from the prior (Monte Carlo: each carries weight 1/S).

    Returns:
        ``(E,)``; ``-inf`` where no hypothesis lies within ε (Monte Carlo has no resolution there).
    """
    if divergences.ndim != 1 or divergences.numel() == 0:
        raise WeightlabError(
            f"divergences must be a non-empty 1-D tensor, got shape {tuple(divergences.shape)}"
        )
    if log_prior is None:
        log_prior = uniform_log_prior(divergences.numel())
    elif log_prior.shape != divergences.shape:
        raise WeightlabError(
            f"log_prior needs shape {tuple(divergences.shape)}, got {tuple(log_prior.shape)}"
        )
    else:
        log_prior = normalize_log_weights(log_prior.to(torch.float64))
    inside = divergences[None, :] <= eps.to(divergences.dtype)[:, None]  # (E, S)
    return torch.logsumexp(torch.where(inside, log_prior[None, :], -math.inf), dim=1)


def unit_ball_log_volume(d: int) -> float:
    """``log V_d = (d/2) log π - log Γ(d/2 + 1)``, the log volume of the unit ball in R^d (``V_0 = 1``)."""
    if d < 0:
        raise WeightlabError(f"dimension must be ≥ 0, got {d}")
    return d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)


def laplace_log_inv_weight(
    fisher: Tensor, eps: Tensor, *, log_prior_density: float, flat_tol: float = 1e-6
) -> tuple[Tensor, int]:
    """The Laplace (flat-minimum) estimate of ``log 1/W(A_ε)``.

    Args:
        fisher: ``(d, d)`` Fisher information ``E_x Σ_y p ∇log p ∇log pᵀ`` at θ* (symmetric PSD).
        eps: ``(E,)`` radii (> 0).
        log_prior_density: ``log w(θ*)`` — the prior density restricted to the stiff subspace (the
            eigenvectors with λ > ``flat_tol``); flat directions are integrated out of the prior.
        flat_tol: eigenvalues at or below it count as flat.

    Returns:
        ``(E,)`` estimates and ``d_eff``, the number of stiff directions.
    """
    if fisher.ndim != 2 or fisher.shape[0] != fisher.shape[1]:
        raise WeightlabError(f"fisher must be a square (d, d) matrix, got shape {tuple(fisher.shape)}")
    if (eps <= 0).any():
        raise WeightlabError(f"eps must be > 0 for the Laplace estimate, got min {float(eps.min())}")
    lam = torch.linalg.eigvalsh(fisher.to(torch.float64))
    stiff = lam[lam > flat_tol]
    d = int(stiff.numel())
    const = -log_prior_density + 0.5 * float(stiff.log().sum()) - unit_ball_log_volume(d)
    return const - d / 2 * torch.log(2 * eps.to(torch.float64)), d


def fisher_information(log_probs_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """``F = mean_x Σ_y p(y|x) ∇log p(y|x) ∇log p(y|x)ᵀ`` at ``theta``.

    Args:
        log_probs_fn: ``θ (d,) -> (M, C)`` log-probabilities at M fixed inputs.
        theta: ``(d,)``.

    Returns:
        ``(d, d)``.
    """
    jac = torch.func.jacrev(log_probs_fn)(theta)  # (M, C, d)
    p = log_probs_fn(theta).exp().detach()  # (M, C)
    return torch.einsum("mc,mci,mcj->ij", p, jac, jac) / p.shape[0]


def resolvability_bound(n: Tensor, eps: Tensor, log_inv_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``min_ε n ε + log 1/W(A_ε)`` for each n, and the minimizing ε.

    Args:
        n: ``(N,)`` sample sizes.
        eps: ``(E,)`` radii.
        log_inv_weight: ``(E,)`` ``log 1/W(A_ε)`` (``+inf`` where W is 0 or unknown).

    Returns:
        ``(N,)`` bounds and ``(N,)`` argmin radii.
    """
    if eps.shape != log_inv_weight.shape:
        raise WeightlabError(
            f"eps and log_inv_weight need the same shape, got {tuple(eps.shape)} "
            f"and {tuple(log_inv_weight.shape)}"
        )
    if not torch.isfinite(log_inv_weight).any():
        raise WeightlabError("no radius has positive weight: every log 1/W(A_ε) is infinite")
    total = n.to(torch.float64)[:, None] * eps.to(torch.float64)[None, :] + log_inv_weight.to(torch.float64)
    best, idx = total.min(dim=1)
    return best, eps[idx]
