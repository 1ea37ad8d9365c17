"""DONE's lower level with a log barrier and its implicit gradient (paper key ``done``; Sow et al., ICLR 2024).

The lower level of the paper's Eq. 7 replaces the ℓ∞ constraint ``‖δ‖∞ ≤ ε`` by a log barrier: every sample's
perturbation maximises

    G(θ, δ) = ℓ(θ, x + δ) + μ · Σ_j log(ε² − δ_j²)          (= μ·Σ_j [log(ε − δ_j) + log(ε + δ_j)])

by projected ascent steps (Alg. 1, lines 5–7): a step, then the projection into the ball shrunk by a small
``margin`` (so the barrier stays finite) and into the image box [0, 1]. ``μ = 0`` is plain PGD, step for step.

The implicit term differentiates the optimality condition ``∇_δ G(θ, δ*(θ)) = 0``:
``∂δ*/∂θ = −H⁻¹ ∇²_{δθ} G`` with ``H = ∇²_{δδ} G``, so for an upper-level gradient ``b = ∂F/∂δ`` the extra
parameter gradient is ``(∂δ*/∂θ)ᵀ b = ∇_θ ⟨∇_δ ℓ(θ, x + δ*), A⁻¹ b⟩`` with ``A = −H`` (the barrier does not
depend on θ). ``A⁻¹ b`` is solved by **preconditioned conjugate gradient** on Hessian-vector products (double
backward): ``A`` is symmetric and, near a maximum of the barrier-regularised problem, positive definite (the
barrier adds at least ``2μ/ε²`` to its diagonal), where CG needs no step size and is exact after as many steps
as there are free coordinates. A Neumann series would need a step below ``2/λ_max(A)``, and the barrier's
diagonal ``2μ(ε² + δ²)/(ε² − δ²)²`` is unbounded near the boundary, so its step would have to be tiny; the same
diagonal is the (Jacobi) preconditioner here. The system is block-diagonal over samples (the attack runs the
model in eval mode), so CG runs per sample, and a sample stops at its first direction of non-positive curvature
(truncated CG, as Steihaug's), where the problem is not locally concave. Coordinates held by a projection (at
the image box or the shrunk ball) have ``∂δ_j/∂θ = 0`` and are left out of the system.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, eval_mode

Ascent = Literal["sign", "gradient"]


def log_barrier(delta: Tensor, eps: float) -> Tensor:
    """``Σ_j log(ε² − δ_j²)`` per sample ``(B,)`` of perturbations ``(B, ...)`` strictly inside the ball."""
    return torch.log(eps * eps - delta * delta).flatten(1).sum(1)


def barrier_curvature(delta: Tensor, eps: float, mu: float) -> Tensor:
    """``−∂²/∂δ_j² μ·log(ε² − δ_j²) = 2μ(ε² + δ_j²)/(ε² − δ_j²)²`` elementwise ``(B, ...)`` (≥ 2μ/ε²)."""
    gap = eps * eps - delta * delta
    return 2 * mu * (eps * eps + delta * delta) / (gap * gap)


@dataclass(frozen=True)
class BarrierPGD(PGD):
    """ℓ∞ projected ascent on the log-barrier-regularised lower level (DONE's Eq. 7, Alg. 1 lines 5–7).

    Args:
        barrier: the barrier coefficient μ ≥ 0 (0: plain PGD, the same steps and random start).
        ascent: ``"sign"`` (PGD's signed steps) or ``"gradient"`` (plain gradient steps, which converge to a
            stationary point, where the implicit gradient is exact).
        margin: with μ > 0, the ball is shrunk to ``(1 − margin)·ε`` so the barrier stays finite.
    """

    barrier: float = 0.0
    ascent: Ascent = "sign"
    margin: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.barrier >= 0 or math.isinf(self.barrier):
            raise WeightlabError(f"barrier coefficient must be a finite number ≥ 0, got {self.barrier}")
        if self.barrier > 0 and self.norm != "linf":
            raise WeightlabError(f"the log barrier is for the linf ball, got norm {self.norm!r}")
        if self.ascent not in ("sign", "gradient"):
            raise WeightlabError(f"ascent must be 'sign' or 'gradient', got {self.ascent!r}")
        if not 0 < self.margin < 1:
            raise WeightlabError(f"barrier margin must be in (0, 1), got {self.margin}")

    @classmethod
    def of(cls, attack: PGD, *, barrier: float, margin: float = 1e-3) -> BarrierPGD:
        """``attack``'s settings (ε, steps, step size, random start) with a barrier; a BarrierPGD keeps its
        ascent."""
        ascent: Ascent = attack.ascent if isinstance(attack, BarrierPGD) else "sign"
        return cls(eps=attack.eps, steps=attack.steps, step_size=attack.step_size, norm=attack.norm,
                   random_start=attack.random_start, barrier=barrier, ascent=ascent, margin=margin)

    @property
    def radius(self) -> float:
        """The radius the projection uses: ε, or ``(1 − margin)·ε`` with a barrier."""
        return self.eps * (1 - self.margin) if self.barrier > 0 else self.eps

    def solve(self, model: nn.Module, x: Tensor, y: Tensor, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Adversarial images ``(B, C, H, W)`` and, per sample ``(B,)``, κ: the number of the ``steps``
        iterates (before each step) that the model still classified correctly (GAIRAT's geometry value;
        counted for the linf ball only, 0 for l2)."""
        with eval_mode(model), torch.enable_grad():
            return self._solve(model, x.detach(), y, generator)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return self._solve(model, x, y, generator)[0]

    def _solve(self, model: nn.Module, x: Tensor, y: Tensor,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if self.norm != "linf":
            return super()._run(model, x, y, generator), torch.zeros(len(y), dtype=torch.long, device=y.device)
        radius = self.radius
        delta = torch.zeros_like(x)  # (B, C, H, W)
        if self.random_start and self.eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            delta = (x + (2 * noise - 1).mul_(radius)).clamp_(0, 1) - x
        kappa = torch.zeros(len(y), dtype=torch.long, device=y.device)  # (B,)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            kappa += (logits.argmax(1) == y).long()
            objective = F.cross_entropy(logits, y, reduction="sum")
            if self.barrier > 0:
                objective = objective + self.barrier * log_barrier(delta, self.eps).sum()
            (grad,) = torch.autograd.grad(objective, delta)
            delta = delta.detach()
            delta.add_(grad.sign() if self.ascent == "sign" else grad, alpha=self.alpha)
            delta.clamp_(-radius, radius)
            delta = (x + delta).clamp_(0, 1).sub_(x)  # stay a valid image
        return (x + delta).clamp_(0, 1).detach(), kappa


def held_coordinates(x: Tensor, delta: Tensor, radius: float) -> Tensor:
    """Boolean ``(B, ...)``: the coordinates a projection holds (at the image box or the ball's radius)."""
    image = x + delta
    return (image <= 0) | (image >= 1) | (delta.abs() >= radius * (1 - 1e-9))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products ``(B, 1, ..., 1)`` of ``(B, ...)`` tensors."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *, steps: int, preconditioner: Tensor,
                       tol: float = 1e-10) -> Tensor:
    """Solve ``A v = b`` per sample (``A`` block-diagonal over the batch) by preconditioned, truncated CG.

    Args:
        matvec: ``v ↦ A v`` on ``(B, ...)`` tensors.
        b: right-hand sides ``(B, ...)``.
        steps: CG iterations (each one ``matvec``).
        preconditioner: positive diagonal of ``M ≈ A`` ``(B, ...)``.
        tol: a sample stops once its residual norm is below ``tol·‖b‖``.

    A sample also stops, keeping its current iterate, at a direction of non-positive curvature ``pᵀAp ≤ 0``.
    """
    v = torch.zeros_like(b)
    r = b.clone()
    z = r / preconditioner
    p = z.clone()
    rz = _dot(r, z)
    active = _dot(b, b) > 0  # (B, 1, ...)
    floor = tol * tol * _dot(b, b)
    for _ in range(steps):
        if not bool(active.any()):
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        active = active & (curvature > 0)
        alpha = torch.where(active, rz / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        v = v + alpha * p
        r = r - alpha * ap
        z = r / preconditioner
        rz_new = _dot(r, z)
        active = active & (_dot(r, r) > floor)
        p = z + torch.where(active, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0) * p
        rz = rz_new
    return v


def implicit_gradient(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, upper: Tensor, *, eps: float,
                      barrier: float, radius: float, cg_steps: int = 10) -> list[Tensor]:
    """The implicit term ``(∂δ*/∂θ)ᵀ b`` of the barrier lower level, one tensor per trainable parameter.

    Args:
        model: the network (run in eval mode, as the attack ran; its mode is restored).
        x: clean images ``(B, C, H, W)``.
        y: labels ``(B,)``.
        delta: the lower-level solution ``δ*`` ``(B, C, H, W)``.
        upper: ``b = ∂F/∂δ`` at ``δ*``, the upper-level objective's gradient ``(B, C, H, W)``.
        eps: the ball's radius; barrier: μ; radius: the radius the projection used (coordinates there are held).
        cg_steps: conjugate-gradient iterations (Hessian-vector products).

    Returns:
        ``∇_θ ⟨∇_δ ℓ(θ, x + δ*), A⁻¹ b⟩`` with ``A = −∇²_δδ G`` restricted to the free coordinates.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model), torch.enable_grad():
        point = delta.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x.detach() + point), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point, create_graph=True)  # ∇_δ ℓ (B, C, H, W), a function of θ
        free = (~held_coordinates(x, point.detach(), radius)).to(delta.dtype)  # (B, C, H, W)
        curvature = barrier_curvature(point.detach(), eps, barrier) if barrier > 0 else torch.zeros_like(delta)

        def matvec(v: Tensor) -> Tensor:  # A v = −(∇²ℓ + barrier Hessian) v on the free coordinates
            (hv,) = torch.autograd.grad(grad, point, grad_outputs=v * free, retain_graph=True)
            return -(hv - curvature * v) * free

        preconditioner = torch.where(curvature > 0, curvature, torch.ones_like(curvature))
        solution = conjugate_gradient(matvec, upper.detach() * free, steps=cg_steps, preconditioner=preconditioner)
        grads = torch.autograd.grad((grad * solution.detach()).sum(), params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]
