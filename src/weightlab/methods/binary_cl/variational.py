"""Variational continual learning with binary weights, trained in field space (``variational-binary-cl``).

Li, Huang, Zou & Huang, "Statistical mechanics of continual learning: variational principle and mean-field
potential", PRE 108, 014309 (2023). Reference code: ``Chan-Li/VCL`` (``Bayesian-Permuated.py``).

Every binary weight ``w ∈ {±1}`` has a real field ``θ`` with ``q(w) ∝ exp(βθw)``, so

    m  = tanh(βθ)                 (mean)
    σ² = 1 − tanh²(βθ)            (variance)

A layer's preactivation is Gaussian under the mean-field approximation (local reparameterisation)::

    z_i = (1/√N) Σ_j m_ij a_j + v_i ε_i,   v_i = sqrt((1/N) Σ_j σ²_ij a_j² + 1e−30),   ε ~ N(0, 1)

Autograd through this forward gives exactly the paper's data term of the field update (the σ² factor comes
from ``dm/dθ = βσ²``, the ε term from ``dσ²/dθ = −2βmσ²``). The KL to the prior ``q(w|θ_prior)`` has
gradient ``β²σ²(θ − θ_prior)``; :class:`VariationalFieldAdam` adds it to the gradient before an Adam step
(β1 0.9, β2 0.99, ε 1e−8 as the reference code). Two prior variants:

* ``prior="task"``: θ_prior is the field at the end of the previous task (the paper's framing; no KL term
  on the first task, which has no previous task) — call :meth:`VariationalFieldAdam.consolidate` after
  each task, or use :class:`ConsolidateField`;
* ``prior="step"``: θ_prior is the field one optimisation step earlier, so the KL gradient is
  ``β²σ²Δθ_prev`` (what the reference code does: ``self.KL`` holds the previous displacement).

β is annealed as ``β = β_max·tanh(0.1 + 2(jE + i + 1)/(TE))`` for task ``j`` of ``T``, epoch ``i`` of ``E``
(:func:`annealed_beta`, applied by :class:`BetaAnnealing`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.data.arrays import Batch
    from weightlab.train.loop import LoopState

Mode = Literal["meanfield", "mean", "sample"]
MODES = ("meanfield", "mean", "sample")


def field_moments(field: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Mean ``tanh(βθ)`` and variance ``1 − tanh²(βθ)`` of the binary weights with fields ``θ``."""
    mean = torch.tanh(beta * field)
    return mean, 1.0 - mean * mean


def sample_binary(field: Tensor, beta: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Binary weights drawn with ``P(w = +1) = e^{βθ} / (2 cosh βθ) = (1 + tanh βθ)/2``."""
    p_plus = 0.5 * (1.0 + torch.tanh(beta * field))
    u = torch.rand(field.shape, generator=generator, dtype=field.dtype).to(field.device)
    return torch.where(u < p_plus, 1.0, -1.0).to(field.dtype)


def binary_kl(field: Tensor, prior: Tensor, beta: float) -> Tensor:
    """KL(q(·|θ) ‖ q(·|θ_prior)) summed over weights; its gradient in θ is ``β²σ²(θ − θ_prior)``."""
    mean = torch.tanh(beta * field)
    log_cosh = torch.logaddexp(beta * field, -beta * field)  # log(2 cosh βθ)
    log_cosh_prior = torch.logaddexp(beta * prior, -beta * prior)
    return (beta * (field - prior) * mean - log_cosh + log_cosh_prior).sum()


def annealed_beta(task: int, epoch: int, *, n_tasks: int, epochs: int, beta_max: float = 10.0) -> float:
    """``β_max·tanh(0.1 + 2(task·E + epoch + 1)/(T·E))`` (reference code, ``Bayesian-Permuated.py``)."""
    return beta_max * math.tanh(0.1 + 2.0 * (task * epochs + epoch + 1) / (n_tasks * epochs))


class VariationalBinaryLinear(nn.Module):
    """A fully connected layer of binary weights with fields ``θ`` ``(out, in)`` and no bias.

    ``mode`` chooses the forward pass: ``"meanfield"`` (Gaussian preactivation with noise ε, used to train
    and, as in the reference code, to evaluate), ``"mean"`` (the noise-free mean ``m·a/√N``) or ``"sample"``
    (binary weights drawn from q, i.e. a real binary network).
    """

    def __init__(
        self, in_features: int, out_features: int, *, beta: float = 1.0, init_std: float = 1.0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.field = nn.Parameter(torch.randn(out_features, in_features) * init_std)  # θ₀ ~ N(0, 1)
        self.beta = beta
        self.mode: Mode = "meanfield"

    def forward(self, a: Tensor) -> Tensor:  # (B, in) -> (B, out)
        scale = 1.0 / math.sqrt(self.in_features)
        if self.mode == "sample":
            return a @ sample_binary(self.field, self.beta).T * scale
        mean, var = field_moments(self.field, self.beta)
        z = a @ mean.T * scale  # (B, out)
        if self.mode == "mean":
            return z
        v = torch.sqrt((a * a) @ var.T / self.in_features + 1e-30)  # (B, out)
        return z + v * torch.randn_like(z)


class VariationalBinaryMLP(nn.Module):
    """Flatten, binary layers with ReLU between them, binary output layer (784-512-512-10 in the paper)."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), *, beta: float = 1.0
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(
            VariationalBinaryLinear(a, b, beta=beta) for a, b in zip(widths, widths[1:], strict=False)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, classes)
        a = x.flatten(1)
        for i, layer in enumerate(self.layers):
            a = layer(a)
            if i < len(self.layers) - 1:
                a = torch.relu(a)
        return a


def binary_layers(model: nn.Module) -> list[VariationalBinaryLinear]:
    layers = [m for m in model.modules() if isinstance(m, VariationalBinaryLinear)]
    if not layers:
        raise WeightlabError(f"{type(model).__name__} has no VariationalBinaryLinear layer")
    return layers


def set_beta(model: nn.Module, beta: float) -> None:
    if not beta > 0:
        raise WeightlabError(f"beta must be > 0, got {beta}")
    for layer in binary_layers(model):
        layer.beta = beta


@contextlib.contextmanager
def forward_mode(model: nn.Module, mode: Mode) -> Iterator[nn.Module]:
    """Temporarily switch every binary layer to ``mode`` (``meanfield``, ``mean`` or ``sample``)."""
    if mode not in MODES:
        raise WeightlabError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    layers = binary_layers(model)
    before = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
    try:
        yield model
    finally:
        for layer, m in zip(layers, before, strict=False):
            layer.mode = m


@dataclass(frozen=True)
class VariationalConfig:
    """Field-space training (defaults of ``Chan-Li/VCL``'s permuted-MNIST script).

    Args:
        prior: ``"task"`` (previous task's field, the paper) or ``"step"`` (field one step earlier, the code).
        kl_weight: factor on the KL gradient relative to the batch-mean loss the loop minimises. None means
            ``1/batch_size`` for ``"step"`` (the reference code adds the KL gradient with weight 1 to a data
            gradient summed over the batch) and ``1/n_train`` for ``"task"`` (the free energy
            ``Σ_n loss_n + KL`` divided by the data size).
        beta_max: the asymptote of the β schedule.
    """

    lr: float = 0.01
    prior: Literal["task", "step"] = "step"
    kl_weight: float | None = None
    beta_max: float = 10.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.prior not in ("task", "step"):
            raise WeightlabError(f"prior must be 'task' or 'step', got {self.prior!r}")
        if not self.lr > 0:
            raise WeightlabError(f"lr must be > 0, got {self.lr}")
        if self.kl_weight is not None and self.kl_weight < 0:
            raise WeightlabError(f"kl_weight must be ≥ 0 or None, got {self.kl_weight}")
        if not self.beta_max > 0:
            raise WeightlabError(f"beta_max must be > 0, got {self.beta_max}")

    def resolved_kl_weight(self, *, n_train: int, batch_size: int) -> float:
        if self.kl_weight is not None:
            return self.kl_weight
        return 1.0 / max(batch_size if self.prior == "step" else n_train, 1)


@register("method", "variational-binary-cl")
class VariationalFieldAdam(torch.optim.Optimizer):
    """Adam over the fields with the KL-to-prior gradient ``kl_weight·β²σ²(θ − θ_prior)`` added first.

    Pass it to :func:`weightlab.train.train` as ``optimizer=``. It reads β from each layer, so β annealing is
    just a callback that sets ``layer.beta``.

    Args:
        layers: the binary layers whose fields are optimised (:func:`binary_layers` of a model).
        config: learning rate, Adam constants and the prior variant.
        kl_weight: the factor applied, usually ``config.resolved_kl_weight(n_train=…, batch_size=…)``.
    """

    def __init__(
        self,
        layers: Sequence[VariationalBinaryLinear],
        config: VariationalConfig = VariationalConfig(),
        *,
        kl_weight: float = 1.0,
    ) -> None:
        self.layers = list(layers)
        self.config = config
        self.kl_weight = kl_weight
        super().__init__(
            [layer.field for layer in self.layers],
            {"lr": config.lr, "betas": config.betas, "eps": config.eps},
        )
        for layer in self.layers:
            st = self.state[layer.field]
            st["prior"] = None  # no prior before the first consolidation
            st["last_delta"] = torch.zeros_like(layer.field)

    def kl_gradient(self, layer: VariationalBinaryLinear) -> Tensor:
        """``kl_weight·β²σ²(θ − θ_prior)`` for one layer (θ − θ_prior is Δθ_prev under the step prior)."""
        st = self.state[layer.field]
        if self.config.prior == "task" and st["prior"] is None:
            return torch.zeros_like(layer.field)
        _, var = field_moments(layer.field.detach(), layer.beta)
        diff = st["last_delta"] if self.config.prior == "step" else layer.field.detach() - st["prior"]
        return self.kl_weight * layer.beta**2 * var * diff

    @torch.no_grad()
    def consolidate(self) -> None:
        """End of a task: the current fields become the prior (``prior="task"``)."""
        for layer in self.layers:
            self.state[layer.field]["prior"] = layer.field.detach().clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        group = self.param_groups[0]
        b1, b2 = group["betas"]
        for layer in self.layers:
            p = layer.field
            if p.grad is None:
                continue
            grad = p.grad + self.kl_gradient(layer)
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            delta = -group["lr"] / bc1 * st["exp_avg"] / (st["exp_avg_sq"].div(bc2).sqrt() + group["eps"])
            p.add_(delta)
            st["last_delta"] = delta


@register("method", "beta-annealing")
class BetaAnnealing(Callback):
    """Set β of every binary layer from :func:`annealed_beta` at each batch (task = experience's task_id).

    Args:
        model: the network whose :class:`VariationalBinaryLinear` layers are annealed.
        config: the field-space settings; the schedule's asymptote is ``config.beta_max``.
        n_tasks, epochs: the length of the schedule (tasks × epochs per task).
    """

    def __init__(
        self, model: nn.Module, config: VariationalConfig = VariationalConfig(), *, n_tasks: int, epochs: int
    ) -> None:
        if n_tasks < 1 or epochs < 1:
            raise WeightlabError(f"BetaAnnealing needs n_tasks ≥ 1 and epochs ≥ 1, got {n_tasks}, {epochs}")
        self.layers = binary_layers(model)
        self.config, self.n_tasks, self.epochs = config, n_tasks, epochs
        self.beta = annealed_beta(0, 0, n_tasks=n_tasks, epochs=epochs, beta_max=config.beta_max)

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        task = getattr(state.experience, "task_id", 0)
        self.beta = annealed_beta(
            task, state.epoch, n_tasks=self.n_tasks, epochs=self.epochs, beta_max=self.config.beta_max
        )
        for layer in self.layers:
            layer.beta = self.beta
        return batch


@register("method", "consolidate-field")
class ConsolidateField(Callback):
    """At the end of each experience, make the fields the prior of the next one (``prior="task"``)."""

    def __init__(self, optimizer: VariationalFieldAdam) -> None:
        self.optimizer = optimizer

    def on_experience_end(self, state: LoopState) -> None:
        self.optimizer.consolidate()


# ---------------------------------------------------------------------------- teacher–student perceptron


def binary_teacher(n: int, *, generator: torch.Generator) -> Tensor:
    """A teacher perceptron's weights ``(n,)`` drawn uniformly from ``{±1}``."""
    return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)


def related_teacher(teacher: Tensor, overlap: float, *, generator: torch.Generator) -> Tensor:
    """A second teacher with expected overlap ``q = w₁·w₂/N`` (flip each bit with probability (1 − q)/2)."""
    if not -1.0 <= overlap <= 1.0:
        raise WeightlabError(f"overlap must lie in [-1, 1], got {overlap}")
    flip = torch.rand(teacher.shape, generator=generator) < (1.0 - overlap) / 2
    return torch.where(flip, -teacher, teacher)


def teacher_data(teacher: Tensor, n_samples: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Gaussian inputs ``(P, N)`` and labels ``(P,)`` in {0, 1} for ``sign(w·x) = ±1``."""
    x = torch.randn(n_samples, teacher.numel(), generator=generator)
    return x, (x @ teacher > 0).long()


class ProbitPerceptron(nn.Module):
    """A binary perceptron in field space. Its two logits ``[log Φ(−z/v), log Φ(z/v)]`` make cross-entropy
    equal the exact mean-field loss ``−log Φ(y·z/v)`` (``z = m·x/√N``, ``v² = Σσ²x²/N``)."""

    def __init__(self, n: int, *, beta: float = 1.0, init_std: float = 0.1) -> None:
        super().__init__()
        self.layer = VariationalBinaryLinear(n, 1, beta=beta, init_std=init_std)

    def forward(self, x: Tensor) -> Tensor:  # (B, N) -> (B, 2)
        mean, var = field_moments(self.layer.field, self.layer.beta)
        n = self.layer.in_features
        z = (x @ mean.T).squeeze(1) / math.sqrt(n)
        v = torch.sqrt((x * x) @ var.T / n + 1e-12).squeeze(1)
        u = z / v
        return torch.stack([torch.special.log_ndtr(-u), torch.special.log_ndtr(u)], dim=1)


def overlaps(student_mean: Tensor, teachers: Sequence[Tensor]) -> list[float]:
    """Order parameters ``R_k = m·w_k/N`` and ``Q = m·m/N`` (appended last) of a student with mean ``m``."""
    m = student_mean.flatten()
    n = m.numel()
    return [float(m @ w / n) for w in teachers] + [float(m @ m / n)]


def generalization_error(overlap_r: float, self_overlap_q: float) -> float:
    """Perceptron generalization error ``arccos(R/√Q)/π`` of the mean-weight student."""
    if self_overlap_q <= 0:
        return 0.5
    return math.acos(max(-1.0, min(1.0, overlap_r / math.sqrt(self_overlap_q)))) / math.pi
