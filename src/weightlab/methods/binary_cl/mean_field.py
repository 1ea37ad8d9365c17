"""Replica-symmetric mean-field theory of the teacher–student binary perceptron learnt in field space, task 1
and then task 2 with the first task's solution as prior and reference (a Franz–Parisi potential), after
Li, Huang, Zou & Huang, PRE 108, 014309 (2023) — paper key ``variational-binary-cl``.

The model (what :class:`~weightlab.methods.binary_cl.variational.ProbitPerceptron` trains). A student with
means ``m ∈ [−1, 1]^N`` (``m = tanh βθ``) predicts label ``y`` of input ``x`` (i.i.d., zero mean, unit
variance) with the mean-field likelihood ``H(−y·u/√(1 − Q))``, ``u = m·x/√N``, ``Q = m·m/N`` and
``H(t) = ∫_t^∞ Dz``. Its energy on a data set is ``E(m) = −Σ_μ log H(−y_μ u_μ/√(1 − Q))``; the labels come
from a binary teacher, ``y = sign(w·x/√N)``.

* **Task 1.** ``m`` is Gibbs-distributed, ``P₁(m) ∝ exp(−β E₁(m))`` on the flat measure over ``[−1, 1]^N``,
  with ``α₁N`` examples of teacher ``w¹``.
* **Task 2.** A reference ``m¹`` is drawn from ``P₁`` and the student learns teacher ``w²`` (overlap
  ``r₀ = w¹·w²/N``, ``α₂N`` examples) under ``P₂(m | m¹) ∝ exp(−β[E₂(m) + γ KL(m ‖ m¹)])``, where
  ``KL(m ‖ m¹)`` is the KL divergence of the binary weight distributions with means ``m`` and ``m¹``. The
  quenched average over the reference is the Franz–Parisi potential; the KL term is the variational rule's
  previous-task prior (``γ = 1`` is ``kl_weight = 1/P``; ``γ = 0`` is learning task 2 from scratch).

Order parameters (replica symmetric): ``q* = m·m/N``, ``q = m^a·m^b/N`` between replicas, ``r = m·w/N``. With
``G_E(q, r, q*) = 2 ∫Dz H(−rz/√(q − r²)) log ∫Dx H(−(√q z + √(q* − q) x)/√(1 − q*))^β`` the conjugates are
``q̂ = −2α ∂G_E/∂q``, ``r̂ = α ∂G_E/∂r``, ``q̂* = α ∂G_E/∂q*`` (here by automatic differentiation), and the
single-site measure (gauge ``w¹_i = +1``) is ``exp((q̂* − q̂/2)m² + (√q̂ z + r̂)m)`` on ``[−1, 1]``, giving
``q = E_z⟨m⟩²``, ``r = E_z⟨m⟩``, ``q* = E_z⟨m²⟩``. Task 2 has the same energetic term in its own order
parameters; its site measure is ``exp((q̂₂* − q̂₂/2)m² + (√q̂₂ x + r̂₂ B)m − βγ KL(m ‖ m¹))`` with the teacher-2
sign ``B = ±1`` (probability ``(1 ± r₀)/2``) and ``m¹`` drawn from task 1's site marginal. The overlap with
teacher 1 after task 2 is ``R₁ = E⟨m⟩``, with teacher 2 ``R₂ = E[B⟨m⟩]``; the clipped binary student
``sign(m)`` has overlaps ``p₁ = E⟨sign m⟩``, ``p₂ = E[B⟨sign m⟩]`` and generalization errors
``arccos(p)/π``.

Assumptions: replica symmetry; every task-2 replica shares one reference (``n → 0`` reference replicas); the
task-1 data do not enter task 2 except through the prior; the student's preactivation variance
``Σ(1 − m²)x²/N`` is replaced by its mean ``1 − q*``. Integrals: fine uniform grids (trapezoid) for the Gaussians,
a ``tanh`` grid (trapezoid) on ``[−1, 1]`` for ``m``, in float64 and log space; the saddle point is found by damped
fixed-point iteration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from weightlab.errors import WeightlabError

EPS = 1e-12


@dataclass(frozen=True)
class MeanFieldConfig:
    """Inverse temperature ``beta`` of the Gibbs measure over the student's means (the paper's 20),
    quadrature sizes, and the damped iteration's settings."""

    beta: float = 20.0
    n_z: int = 1201
    n_x: int = 401
    n_m: int = 201
    damping: float = 0.5
    max_iter: int = 200
    tol: float = 1e-6

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise WeightlabError(f"mean-field beta must be > 0, got {self.beta}")
        if min(self.n_z, self.n_x, self.n_m) < 16:
            raise WeightlabError(f"need ≥ 16 quadrature nodes each, got n_z={self.n_z}, n_x={self.n_x}, "
                                 f"n_m={self.n_m}")
        if self.max_iter < 1:
            raise WeightlabError(f"max_iter must be ≥ 1, got {self.max_iter}")
        if not 0 < self.damping <= 1:
            raise WeightlabError(f"damping must lie in (0, 1], got {self.damping}")


@dataclass(frozen=True)
class Overlaps:
    """A saddle point: order parameters, conjugates, the clipped student's overlaps and convergence."""

    q: float
    r: float
    q_star: float
    q_hat: float
    r_hat: float
    q_star_hat: float
    p: float  # overlap of sign(m) with the task's teacher
    r_other: float = math.nan  # task 2: R₁ = overlap of m with teacher 1
    p_other: float = math.nan  # task 2: p₁ = overlap of sign(m) with teacher 1
    iterations: int = 0
    converged: bool = False

    @property
    def error(self) -> float:
        """Generalization error ``arccos(p)/π`` of the clipped binary student on its task."""
        return math.acos(max(-1.0, min(1.0, self.p))) / math.pi

    @property
    def error_other(self) -> float:
        """Task 2: the clipped student's generalization error on task 1."""
        return math.acos(max(-1.0, min(1.0, self.p_other))) / math.pi


def symmetric_grid(n: int, span: float) -> Tensor:
    """``n`` equally spaced float64 points on ``[−span, span]``, exactly symmetric (0 itself for odd ``n``)."""
    return (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * (2 * span / (n - 1))


@functools.lru_cache(maxsize=8)
def normal_grid(n: int, *, span: float = 8.0) -> tuple[Tensor, Tensor]:
    """Nodes and log-weights ``(n,)`` of ``∫Dz f(z) ≈ Σ exp(lw_k) f(z_k)`` (standard normal measure) on a
    uniform grid over ``[−span, span]``: the integrands here have steps as sharp as the fields are large,
    which a fine trapezoid resolves and a Gauss–Hermite rule does not."""
    z = symmetric_grid(n, span)
    log_w = math.log(float(z[1] - z[0])) - 0.5 * z * z - 0.5 * math.log(2 * math.pi)
    return z, log_w - torch.logsumexp(log_w, 0)


@functools.lru_cache(maxsize=8)
def m_grid(n: int, *, span: float = 10.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nodes ``m = tanh u`` on a uniform grid of ``n`` points ``u ∈ [−span, span]`` and the log-weights of
    ``∫_{−1}^{1} f(m) dm = ∫ f(tanh u) sech²u du`` (trapezoid: exact to float precision for the smooth
    site measures, however close to ±1 they concentrate), with ``log(1 + m)`` and ``log(1 − m)`` computed
    without cancellation."""
    u = symmetric_grid(n, span)
    log_up = math.log(2.0) - torch.nn.functional.softplus(-2 * u)  # log(1 + tanh u) = log(2 / (1 + e^{−2u}))
    log_down = math.log(2.0) - torch.nn.functional.softplus(2 * u)  # log(1 − tanh u)
    log_w = math.log(float(u[1] - u[0])) + log_up + log_down  # sech²u = (1 + m)(1 − m)
    return torch.tanh(u), log_w, log_up, log_down


def log_h(t: Tensor) -> Tensor:
    """``log H(t) = log ∫_t^∞ Dz = log Φ(−t)``, stable for large ``|t|``."""
    return torch.special.log_ndtr(-t)


def energetic(q: Tensor, r: Tensor, q_star: Tensor, beta: float, *, n_z: int = 1201, n_x: int = 401) -> Tensor:
    """``G_E(q, r, q*)`` of the module docstring (a differentiable float64 scalar)."""
    z, lw = normal_grid(n_z)
    x, lwx = normal_grid(n_x)
    zc, xc = z[:, None], x[None, :]  # z: shared field (rows), x: replica field (columns)
    spread = torch.sqrt((q_star - q).clamp_min(EPS))
    noise = torch.sqrt((1 - q_star).clamp_min(EPS))
    inner = torch.logsumexp(lwx[None, :] + beta * log_h(-(torch.sqrt(q.clamp_min(EPS)) * zc + spread * xc) / noise),
                            dim=1)  # (n,) log ∫Dx H(...)^β
    teacher = torch.exp(log_h(-r * z / torch.sqrt((q - r * r).clamp_min(EPS))))  # P(y = +1 | z)
    return 2 * torch.sum(torch.exp(lw) * teacher * inner)


def conjugates(q: float, r: float, q_star: float, *, alpha: float,
               config: MeanFieldConfig) -> tuple[float, float, float]:
    """``(q̂, r̂, q̂*) = (−2α ∂G_E/∂q, α ∂G_E/∂r, α ∂G_E/∂q*)``; all zero without data (``α = 0``)."""
    if alpha == 0:
        return 0.0, 0.0, 0.0
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (q, r, q_star)]
    dq, dr, dqs = torch.autograd.grad(energetic(*params, config.beta, n_z=config.n_z, n_x=config.n_x), params)
    return -2 * alpha * float(dq), alpha * float(dr), alpha * float(dqs)


def site_log_weights(a: float | Tensor, h: Tensor, log_w: Tensor, m: Tensor) -> Tensor:
    """Normalised log-weights ``(..., n_m)`` of the site measure ``exp(a m² + h m)`` on the nodes ``m``."""
    logits = log_w + a * m * m + h[..., None] * m
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def site_averages(a: float, h: Tensor, *, n_m: int = 401) -> tuple[Tensor, Tensor, Tensor]:
    """``⟨m⟩``, ``⟨m²⟩`` and ``⟨sign m⟩`` under ``exp(a m² + h m)`` on ``[−1, 1]``, for every field in ``h``.

    Known answer: ``a = 0`` gives ``⟨m⟩ = coth h − 1/h`` (the Langevin function) and ``⟨m²⟩ = 1/3`` at h = 0.
    """
    m, log_w, _, _ = m_grid(n_m)
    p = torch.exp(site_log_weights(a, h.to(torch.float64), log_w, m))
    return p @ m, p @ (m * m), p @ torch.sign(m)


def _damped(old: tuple[float, ...], new: tuple[float, ...], eta: float) -> tuple[float, ...]:
    return tuple(o + eta * (n - o) for o, n in zip(old, new, strict=True))


def _project(q: float, r: float, q_star: float) -> tuple[float, float, float]:
    """Keep the iteration inside ``r² ≤ q ≤ q* < 1``."""
    q_star = min(max(q_star, 1e-9), 1 - 1e-9)
    q = min(max(q, 1e-9), q_star)
    r = max(min(r, math.sqrt(q) * (1 - 1e-9)), -math.sqrt(q) * (1 - 1e-9))
    return q, r, q_star


def first_task(alpha: float, config: MeanFieldConfig = MeanFieldConfig()) -> Overlaps:
    """The saddle point of task 1 with ``α N`` examples (no data, ``α = 0``: ``q = r = 0``, ``q* = 1/3``)."""
    if alpha < 0:
        raise WeightlabError(f"alpha must be ≥ 0, got {alpha}")
    z, lw = normal_grid(config.n_z)
    pz = torch.exp(lw)
    q, r, q_star = 0.02, 0.01, 0.4
    hats = (0.0, 0.0, 0.0)
    for it in range(1, config.max_iter + 1):
        hats = _damped(hats, conjugates(q, r, q_star, alpha=alpha, config=config), config.damping)
        q_hat, r_hat, qs_hat = hats
        mean, second, sign = site_averages(qs_hat - q_hat / 2, math.sqrt(max(q_hat, 0.0)) * z + r_hat, n_m=config.n_m)
        new = _project(float(pz @ mean**2), float(pz @ mean), float(pz @ second))
        change = max(abs(a - b) for a, b in zip(new, (q, r, q_star), strict=True))
        q, r, q_star = _project(*_damped((q, r, q_star), new, config.damping))
        iterations = it
        if change < config.tol:
            break
    return Overlaps(q, r, q_star, *hats, p=float(pz @ sign), iterations=iterations, converged=change < config.tol)


def reference_marginal(first: Overlaps, config: MeanFieldConfig) -> tuple[Tensor, Tensor]:
    """Task 1's site marginal of the reference mean ``m¹`` on the nodes of :func:`m_grid`: a mask of the
    nodes kept (negligible ones dropped) and their probabilities."""
    z, lw = normal_grid(config.n_z)
    m, log_w, _, _ = m_grid(config.n_m)
    h = math.sqrt(max(first.q_hat, 0.0)) * z + first.r_hat
    logp = torch.logsumexp(lw[:, None] + site_log_weights(first.q_star_hat - first.q_hat / 2, h, log_w, m), dim=0)
    keep = logp > logp.max() - 40
    p = torch.exp(logp[keep])
    return keep, p / p.sum()


def binary_kl(log_up: Tensor, log_down: Tensor, ref_up: Tensor, ref_down: Tensor) -> Tensor:
    """KL between binary weight distributions with means ``m`` and ``m_ref``, from ``log(1 ± m)`` and
    ``log(1 ± m_ref)`` (broadcast): ``((1+m)/2)·log((1+m)/(1+m_ref)) + ((1−m)/2)·log((1−m)/(1−m_ref))``."""
    return 0.5 * torch.exp(log_up) * (log_up - ref_up) + 0.5 * torch.exp(log_down) * (log_down - ref_down)


def second_task(first: Overlaps, alpha: float, *, teacher_overlap: float, gamma: float,
                config: MeanFieldConfig = MeanFieldConfig()) -> Overlaps:
    """The saddle point of task 2 (``α N`` examples of a teacher at overlap ``r₀`` with teacher 1) under the
    prior ``γ KL(m ‖ m¹)`` to a reference ``m¹`` of task 1; ``r_other``/``p_other`` are the overlaps with
    teacher 1. ``γ = 0`` decouples the tasks: task 2's saddle point is then :func:`first_task`'s at ``α``."""
    if alpha < 0 or gamma < 0 or not -1 <= teacher_overlap <= 1:
        raise WeightlabError(f"need alpha ≥ 0, gamma ≥ 0 and teacher_overlap in [-1, 1], got {alpha}, {gamma}, "
                             f"{teacher_overlap}")
    keep, p_ref = reference_marginal(first, config)  # (n1,)
    x, lw = normal_grid(config.n_x)
    m, log_w, log_up, log_down = m_grid(config.n_m)
    px = torch.exp(lw)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64)
    p_sign = torch.tensor([(1 + teacher_overlap) / 2, (1 - teacher_overlap) / 2], dtype=torch.float64)
    coupling = -config.beta * gamma * binary_kl(log_up[None, :], log_down[None, :], log_up[keep][:, None],
                                                log_down[keep][:, None])  # (n1, n_m)
    weight = p_ref[:, None, None] * px[None, :, None] * p_sign[None, None, :]  # (n1, n_x, 2)
    q, r, q_star = 0.02, 0.01 * teacher_overlap, 0.4
    hats = (0.0, 0.0, 0.0)
    for it in range(1, config.max_iter + 1):
        hats = _damped(hats, conjugates(q, r, q_star, alpha=alpha, config=config), config.damping)
        q_hat, r_hat, qs_hat = hats
        field = math.sqrt(max(q_hat, 0.0)) * x[:, None] + r_hat * signs[None, :]  # (n_x, 2)
        logits = (log_w + (qs_hat - q_hat / 2) * m * m)[None, None, None, :] + field[None, :, :, None] * m \
            + coupling[:, None, None, :]  # (n1, n_x, 2, n_m)
        prob = torch.softmax(logits, dim=-1)
        mean, second, sign = prob @ m, prob @ (m * m), prob @ torch.sign(m)  # (n1, n_x, 2)
        new = _project(float((weight * mean**2).sum()), float((weight * mean * signs).sum()),
                       float((weight * second).sum()))
        change = max(abs(a - b) for a, b in zip(new, (q, r, q_star), strict=True))
        q, r, q_star = _project(*_damped((q, r, q_star), new, config.damping))
        iterations = it
        if change < config.tol:
            break
    return Overlaps(q, r, q_star, *hats, p=float((weight * sign * signs).sum()),
                    r_other=float((weight * mean).sum()), p_other=float((weight * sign).sum()),
                    iterations=iterations, converged=change < config.tol)
