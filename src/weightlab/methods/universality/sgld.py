"""Stochastic gradient Langevin dynamics as a ``torch.optim.Optimizer`` (paper key ``universality``).

The Universality Lens (Feder, Urbanke & Fogel, arXiv 2506.07661) approximates the Bayesian mixture learner by
SGLD (Welling & Teh, ICML 2011) plus ensembling. With ``U(θ) = -log w(θ) - N · mean_batch log p(y|x,θ)``
(the mini-batch estimate of the negative log posterior) one step is

    θ ← θ - (η_t / 2) ∇U(θ) + sqrt(η_t · T) ξ,      ξ ~ N(0, I),      η_t = a (b + t)^(-γ),

with temperature ``T`` (``T = 1``: the posterior; ``T = 0``: gradient descent on ``U``, i.e. MAP).
With ``precondition=True`` it is pSGLD (Li et al., AAAI 2016): an RMSprop diagonal ``G = 1/(λ + sqrt(V))``,
``V ← αV + (1-α) ḡ²`` with ``ḡ`` the mean mini-batch gradient, step ``-(η/2) G ∇U + sqrt(η T G) ξ``
(the small ``Γ`` correction term is dropped, as in the pSGLD paper's experiments).
``schedule="cyclical"`` is cyclical SG-MCMC (Zhang et al., ICLR 2020): ``η_t = (a/2)(cos(π r_t) + 1)`` with
``r_t`` the position in the current cycle; the first ``explore_fraction`` of each cycle adds no noise.

The optimizer reads ``p.grad`` as the gradient of the **mean** negative log-likelihood of the mini-batch,
which is what the one training loop produces; ``num_data`` (N) and ``prior_std`` (an isotropic Gaussian
prior) turn it into ``∇U`` inside the step. So SGLD is used with the ordinary loop:

    opt = SGLD(model.parameters(), SGLDConfig(num_data=len(data), prior_std=1.0, lr=1e-3))
    samples = CollectSamples(CollectConfig(every=10, burn_in=200))
    train(model, data, TrainConfig(max_steps=1000), optimizer=opt, callbacks=[samples])

The step size comes from :class:`SGLDConfig` alone: ``TrainConfig.lr`` and ``TrainConfig.schedule`` do not
apply to it. Several chains run as one batched computation with
:class:`weightlab.methods.universality.sgld_chains.StackedMLP`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


def polynomial_step_size(t: int, *, a: float, b: float, gamma: float) -> float:
    """Welling–Teh's ``η_t = a (b + t)^(-γ)`` (γ ∈ (0.5, 1] satisfies Robbins–Monro; γ = 0 is constant)."""
    return a * (b + t) ** (-gamma)


def cyclical_step_size(t: int, *, a: float, total_steps: int, cycles: int) -> float:
    """cSG-MCMC's ``η_t = (a/2)(cos(π · mod(t, L)/L) + 1)`` with cycle length ``L = ceil(total/cycles)``."""
    length = math.ceil(total_steps / cycles)
    return a / 2 * (math.cos(math.pi * (t % length) / length) + 1)


def cycle_position(t: int, *, total_steps: int, cycles: int) -> float:
    """Where step ``t`` lies in its cycle, in [0, 1)."""
    length = math.ceil(total_steps / cycles)
    return (t % length) / length


@dataclass(frozen=True)
class SGLDConfig:
    """SGLD settings (defaults: Welling & Teh's schedule shape, the exact posterior ``T = 1``).

    Attributes:
        num_data: N, the training-set size that scales the mean mini-batch gradient.
        prior_std: σ of the isotropic Gaussian prior ``N(0, σ² I)``; ``None`` means a flat prior.
        lr: ``a`` in ``a (b + t)^(-γ)`` (the peak step size for the cyclical schedule).
        b, gamma: the polynomial decay; ``gamma = 0`` is a constant step.
        temperature: T (1: posterior, 0: no noise).
        precondition: RMSprop preconditioning (pSGLD) with ``alpha`` and ``eps`` (λ).
        schedule: ``polynomial`` or ``cyclical``; the cyclical one needs ``total_steps`` and ``cycles``.
        explore_fraction: cyclical only: the noise-free share of each cycle.
    """

    num_data: int
    prior_std: float | None = 1.0
    lr: float = 1e-4
    b: float = 1.0
    gamma: float = 0.55
    temperature: float = 1.0
    precondition: bool = False
    alpha: float = 0.99
    eps: float = 1e-5
    schedule: Literal["polynomial", "cyclical"] = "polynomial"
    total_steps: int | None = None
    cycles: int = 4
    explore_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.num_data < 1:
            raise WeightlabError(f"num_data must be ≥ 1, got {self.num_data}")
        if self.prior_std is not None and not self.prior_std > 0:
            raise WeightlabError(f"prior_std must be > 0 or None (flat prior), got {self.prior_std}")
        if not self.lr > 0:
            raise WeightlabError(f"lr (a) must be > 0, got {self.lr}")
        if not self.b > 0:
            raise WeightlabError(f"b must be > 0, got {self.b}")
        if not 0 <= self.gamma <= 1:
            raise WeightlabError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.temperature < 0:
            raise WeightlabError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 <= self.alpha < 1:
            raise WeightlabError(f"alpha must lie in [0, 1), got {self.alpha}")
        if self.schedule not in ("polynomial", "cyclical"):
            raise WeightlabError(f"schedule must be polynomial or cyclical, got {self.schedule!r}")
        if self.schedule == "cyclical":
            if self.total_steps is None or self.total_steps < 1:
                raise WeightlabError(f"the cyclical schedule needs total_steps ≥ 1, got {self.total_steps}")
            if not 1 <= self.cycles <= self.total_steps:
                raise WeightlabError(
                    f"cycles must lie in 1..total_steps={self.total_steps}, got {self.cycles}"
                )
            if not 0 <= self.explore_fraction < 1:
                raise WeightlabError(f"explore_fraction must lie in [0, 1), got {self.explore_fraction}")


@register("method", "sgld")
class SGLD(torch.optim.Optimizer):
    """SGLD / pSGLD / cyclical SGLD over ``params`` (see the module docstring for the update).

    Args:
        params: parameters (or parameter groups) to sample.
        config: :class:`SGLDConfig`.
        generator: source of the Gaussian noise (default: torch's global generator).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        config: SGLDConfig,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(params, {"lr": config.lr})
        self.config = config
        self.generator = generator
        self.steps = 0  # t, the number of steps taken

    def step_size(self, t: int | None = None) -> float:
        """η_t for step ``t`` (default: the next step)."""
        c, t = self.config, self.steps if t is None else t
        if c.schedule == "cyclical":
            return cyclical_step_size(t, a=c.lr, total_steps=c.total_steps or 1, cycles=c.cycles)
        return polynomial_step_size(t, a=c.lr, b=c.b, gamma=c.gamma)

    def in_exploration(self, t: int | None = None) -> bool:
        """Whether step ``t`` lies in a cyclical schedule's noise-free exploration stage."""
        c, t = self.config, self.steps if t is None else t
        if c.schedule != "cyclical":
            return False
        return cycle_position(t, total_steps=c.total_steps or 1, cycles=c.cycles) < c.explore_fraction

    def is_sampling(self, t: int | None = None) -> bool:
        """Whether step ``t`` adds noise (T > 0, outside a cyclical schedule's exploration stage)."""
        return self.config.temperature > 0 and not self.in_exploration(t)

    @torch.no_grad()
    def step(self, closure=None, *, noise: Sequence[Tensor | None] | None = None):
        """One SGLD step. ``noise`` optionally gives the standard-normal draws ``ξ``, one per parameter with
        a gradient, in parameter order (for tests that compare batched and sequential chains)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        c = self.config
        eta = self.step_size()
        sampling = self.is_sampling()
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad_u = p.grad * c.num_data  # N · ∇ mean NLL
                if c.prior_std is not None:
                    grad_u = grad_u + p / c.prior_std**2  # -∇ log N(0, σ²)
                if c.precondition:
                    state = self.state[p]
                    if "square_avg" not in state:
                        state["square_avg"] = torch.zeros_like(p)
                    v = state["square_avg"].mul_(c.alpha).addcmul_(p.grad, p.grad, value=1 - c.alpha)
                    precond = 1.0 / (c.eps + v.sqrt())
                    p.addcmul_(precond, grad_u, value=-eta / 2)
                else:
                    precond = None
                    p.add_(grad_u, alpha=-eta / 2)
                if sampling:
                    xi = noise[k] if noise is not None else None
                    if xi is None:
                        xi = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                    scale = math.sqrt(eta * c.temperature)
                    p.add_(xi * (scale if precond is None else scale * precond.sqrt()))
                k += 1
        self.steps += 1
        return loss

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["sgld_steps"] = self.steps
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("sgld_steps", 0))
        super().load_state_dict(state_dict)


@dataclass(frozen=True)
class CollectConfig:
    """Thinning of the posterior samples: one every ``every`` steps after the first ``burn_in`` steps."""

    every: int = 1
    burn_in: int = 0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise WeightlabError(f"every must be ≥ 1, got {self.every}")
        if self.burn_in < 0:
            raise WeightlabError(f"burn_in must be ≥ 0, got {self.burn_in}")


@register("method", "collect-samples")
class CollectSamples(Callback):
    """Keep copies of the model's parameters during training: the posterior samples of one run.

    A sample is taken after every ``every``-th step once ``burn_in`` steps are done; with a cyclical
    :class:`SGLD` schedule only after steps of the sampling stage (not the exploration stage). It reads
    ``state.model``, so it holds no model.

    Attributes:
        samples: list of ``{name: tensor}`` snapshots.
    """

    def __init__(self, config: CollectConfig = CollectConfig()) -> None:
        self.config = config
        self.samples: list[dict[str, Tensor]] = []

    def after_step(self, state: LoopState) -> None:
        done, c = state.step, self.config  # steps completed
        if done <= c.burn_in or (done - c.burn_in) % c.every:
            return
        opt = state.optimizer
        if isinstance(opt, SGLD) and opt.in_exploration(opt.steps - 1):
            return
        self.samples.append({k: v.detach().clone() for k, v in state.model.named_parameters()})
