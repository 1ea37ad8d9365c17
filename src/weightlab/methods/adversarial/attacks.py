"""Adversarial attacks (FGSM, PGD ℓ∞/ℓ2), robust evaluation and adversarial training.

Shared by the ``rift``, ``done`` and ``rws`` papers. Every attack takes a model and a batch of images in
[0, 1] and returns adversarial images in [0, 1] inside the ε-ball around the batch. The model is put in eval
mode for the attack (so BatchNorm uses its running statistics and ε = 0 gives back clean accuracy, which
torchattacks users trip over) and its mode is restored afterwards.

    attack = PGD(eps=8 / 255, steps=10)                 # ℓ∞ PGD with a random start (Madry et al.)
    x_adv = attack(model, x, y)                          # (B, C, H, W), in [0, 1]
    logits, y = adversarial_predict(model, test, attack)
    tail_metrics(per_class_accuracy(logits, y, 10))      # mean, worst-class and bottom-30% accuracy

Training: ``train(model, data, cfg, callbacks=[AdversarialTraining(PGD(eps=0.1, steps=3))])``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, Batch, DataLike, array_view, iter_batches
from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import predict

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState

Norm = Literal["linf", "l2"]


def check_images(x: Tensor, *, name: str = "x") -> None:
    """Raise :class:`WeightlabError` unless every value of ``x`` lies in [0, 1]."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or math.isnan(lo) or math.isnan(hi):
        raise WeightlabError(
            f"{name} must hold images in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            "(attack the un-normalised images; put the normalisation inside the model)"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _flat_norm(t: Tensor) -> Tensor:
    """ℓ2 norm of each sample, shaped to broadcast against ``t`` ``(B, 1, 1, ...)``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project the perturbations ``delta`` ``(B, ...)`` onto the ε-ball of ``norm`` (in place, returned)."""
    if norm == "linf":
        return delta.clamp_(-eps, eps)
    factor = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp_(max=1.0)  # (B, 1, ...)
    return delta.mul_(factor)


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent on the cross-entropy (Madry et al.); ``steps=1`` without a random start and
    ``step_size=eps`` is FGSM.

    Args:
        eps: radius of the ball (ℓ∞: per pixel; ℓ2: per image).
        steps: gradient steps.
        step_size: step length; default ``2.5 · eps / steps`` (Madry et al.).
        norm: ``"linf"`` (signed-gradient steps) or ``"l2"`` (normalised-gradient steps).
        random_start: start from a uniform point in the ball (ℓ2: a random direction at a uniform radius).
    """

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: Norm = "linf"
    random_start: bool = True

    def __post_init__(self) -> None:
        if not self.eps >= 0 or math.isinf(self.eps):
            raise WeightlabError(f"attack eps must be a finite number ≥ 0, got {self.eps}")
        if self.steps < 1:
            raise WeightlabError(f"attack steps must be ≥ 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise WeightlabError(f"attack step_size must be > 0, got {self.step_size}")
        if self.norm not in ("linf", "l2"):
            raise WeightlabError(f"attack norm must be 'linf' or 'l2', got {self.norm!r}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        """Adversarial examples ``(B, C, H, W)`` for images ``x`` in [0, 1] with labels ``y`` ``(B,)``."""
        if check:
            check_images(x)
        with eval_mode(model), torch.enable_grad():
            return self._run(model, x.detach(), y, generator)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        delta = torch.zeros_like(x)  # (B, C, H, W)
        if self.random_start and self.eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            if self.norm == "linf":
                delta = (2 * noise - 1).mul_(self.eps)
            else:
                direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                radius = noise.flatten(1)[:, :1].view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1) ~ U(0, 1)
                delta = direction / _flat_norm(direction).clamp_min(1e-12) * radius * self.eps
            delta = (x + delta).clamp_(0, 1) - x
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = ascent_step(x, delta, grad, self)
        return (x + delta).clamp_(0, 1).detach()


def ascent_step(x: Tensor, delta: Tensor, grad: Tensor, attack: PGD) -> Tensor:
    """One step of ``attack`` on the perturbation ``delta`` ``(B, ...)`` along ``grad``: a signed (ℓ∞) or
    normalised (ℓ2) step of ``attack.alpha``, projected onto the ε-ball and back into valid images."""
    delta = delta.detach()
    if attack.norm == "linf":
        delta.add_(grad.sign(), alpha=attack.alpha)
    else:
        delta.add_(grad / _flat_norm(grad).clamp_min(1e-12), alpha=attack.alpha)
    project(delta, attack.eps, attack.norm)
    return (x + delta).clamp_(0, 1).sub_(x)  # stay a valid image


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Tensor:
    """The fast gradient sign method (Goodfellow et al.): one ℓ∞ step of size ``eps`` from ``x``."""
    return PGD(eps=eps, steps=1, step_size=eps if eps > 0 else None, random_start=False)(model, x, y)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: Norm = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional form of :class:`PGD`."""
    attack = PGD(eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=random_start)
    return attack(model, x, y, generator=generator)


def adversarial_dataset(
    model: nn.Module, data: DataLike, attack: PGD, *, batch_size: int = 256, seed: int = 0
) -> ArrayDataset:
    """``data`` with every image replaced by its adversarial example against ``model`` (a fixed set).

    ``data`` is any dataset of ``(x, y[, t])`` samples or a DataLoader (in the order it yields)."""
    view = array_view(data)
    if view is not None:
        check_images(view.x, name="data.x")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    xs, ys, ts = [], [], []
    for b in iter_batches(data, batch_size):
        if view is None:
            check_images(b.x, name="data.x")
        xs.append(attack(model, b.x.to(device), b.y.to(device), generator=generator, check=False).cpu())
        ys.append(b.y)
        ts.append(b.t)
    if not xs:
        raise WeightlabError("cannot attack an empty dataset")
    t = None if any(v is None for v in ts) else torch.cat(ts)  # type: ignore[arg-type]
    return ArrayDataset(torch.cat(xs), torch.cat(ys), t)


def adversarial_predict(
    model: nn.Module, data: DataLike, attack: PGD, *, batch_size: int = 256, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits ``(N, classes)`` of ``model`` on the adversarial examples of ``data``, and targets ``(N,)``."""
    adv = adversarial_dataset(model, data, attack, batch_size=batch_size, seed=seed)
    return predict(model, adv, batch_size=batch_size)  # eval mode, task ids kept


def tail_metrics(per_class: Tensor, *, tail_fraction: float = 0.3) -> dict[str, float]:
    """Mean, worst-class and bottom-``tail_fraction`` mean of per-class accuracies ``(C,)`` (NaNs dropped).

    The bottom 30% of 10 classes are the 3 lowest (DONE's RA-Tail-30).
    """
    if not 0 < tail_fraction <= 1:
        raise WeightlabError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    acc = per_class[~torch.isnan(per_class)]
    if acc.numel() == 0:
        return {"mean": float("nan"), "worst": float("nan"), "tail": float("nan")}
    k = max(1, math.ceil(tail_fraction * acc.numel()))
    return {
        "mean": acc.mean().item(),
        "worst": acc.min().item(),
        "tail": acc.sort().values[:k].mean().item(),
    }


@register("method", "adversarial-training")
class AdversarialTraining(Callback):
    """Adversarial training (Madry et al.): every mini-batch is replaced by its adversarial examples.

    The attack runs in eval mode (see :class:`PGD`) and draws its random start from the loop's generator,
    so a run is deterministic for a given seed. It acts on ``state.model``, so it holds no model.

    Args:
        attack: the frozen attack settings (its config; Madry et al.'s ℓ∞ PGD by default).
    """

    def __init__(self, attack: PGD = PGD()) -> None:
        self.attack = attack

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        x_adv = self.attack(state.model, batch.x, batch.y, generator=state.generator, check=False)
        return Batch(x_adv, batch.y, batch.t)
