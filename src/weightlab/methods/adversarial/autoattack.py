"""AutoAttack evaluation (Croce & Hein, ICML 2020) from torchattacks' attacks, at the standard settings.

The ``standard`` ensemble is APGD-CE (100 iterations), APGD-T (100 iterations, the 9 most likely wrong
classes as targets), FAB-T (100 iterations, 9 targets) and Square (5,000 queries), each run in turn on the
points that are still robust; a point counts as robust only if every attack failed on it (the per-point worst
case). torchattacks (the ``attacks`` extra) supplies the four attacks; weightlab composes them because
``torchattacks.AutoAttack`` 3.5.1 runs APGD, APGD-T and FAB with 10 iterations instead of the reference's 100.
The prediction on the final images is recomputed here, not taken from the attacks.

    config = AutoAttackConfig(eps=0.1)                      # ℓ∞, the standard version
    result = autoattack_evaluate(model, test, config)      # images in [0, 1]; normalisation inside the model
    result.robust_accuracy, result.per_class, result.broken_by

The model runs in eval mode (its mode is restored), the global torch RNG is left as it was (torchattacks
reseeds it), and a run is deterministic for ``config.seed`` on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, DataLike, as_array_dataset
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import check_images, eval_mode, tail_metrics
from weightlab.stats import binomial_se  # re-exported: the AutoAttack API reports it

AttackName = Literal["apgd-ce", "apgd-t", "fab-t", "square"]
STANDARD: tuple[AttackName, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
INSTALL = "pip install 'weightlab[attacks]' && pip install --no-deps 'torchattacks>=3.5'"


@dataclass(frozen=True)
class AutoAttackConfig:
    """Settings of the AutoAttack evaluation; the defaults are the reference's ``version='standard'``.

    Args:
        eps: radius of the threat model (ℓ∞ per pixel, ℓ2 per image) on images in [0, 1].
        norm: ``"Linf"`` or ``"L2"``.
        attacks: which attacks to run, in order (the standard four by default).
        apgd_steps, fab_steps, square_queries: iterations of APGD / APGD-T, of FAB-T, and Square's queries.
        n_targets: target classes of APGD-T and FAB-T (the reference: 9, i.e. classes − 1 for 10 classes).
        n_classes: classes of the model's output.
        seed: seed of every attack's random choices.
        batch_size: points attacked at once.
    """

    eps: float = 8 / 255
    norm: Literal["Linf", "L2"] = "Linf"
    attacks: tuple[AttackName, ...] = STANDARD
    apgd_steps: int = 100
    fab_steps: int = 100
    square_queries: int = 5000
    n_targets: int = 9
    n_classes: int = 10
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self) -> None:
        if not self.eps > 0 or math.isinf(self.eps):
            raise WeightlabError(f"AutoAttack eps must be a finite number > 0, got {self.eps}")
        if self.norm not in ("Linf", "L2"):
            raise WeightlabError(f"AutoAttack norm must be 'Linf' or 'L2', got {self.norm!r}")
        unknown = [a for a in self.attacks if a not in STANDARD]
        if not self.attacks or unknown:
            raise WeightlabError(f"AutoAttack attacks must be some of {', '.join(STANDARD)}, got {self.attacks}")
        for name in ("apgd_steps", "fab_steps", "square_queries", "n_targets", "batch_size"):
            if getattr(self, name) < 1:
                raise WeightlabError(f"AutoAttack {name} must be ≥ 1, got {getattr(self, name)}")
        if not 1 <= self.n_targets < self.n_classes:
            raise WeightlabError(f"AutoAttack n_targets must be in [1, {self.n_classes - 1}], got {self.n_targets}")


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError:
        raise WeightlabError(f"AutoAttack needs torchattacks, which is not installed: {INSTALL}") from None
    return torchattacks


def build_attacks(model: nn.Module, config: AutoAttackConfig) -> dict[AttackName, Callable[[Tensor, Tensor], Tensor]]:
    """The torchattacks objects of ``config.attacks`` against ``model``, by name, in order."""
    ta = _torchattacks()
    common = {"eps": config.eps, "norm": config.norm, "seed": config.seed, "n_restarts": 1}
    made: dict[str, Callable[[], Any]] = {
        "apgd-ce": lambda: ta.APGD(model, steps=config.apgd_steps, loss="ce", **common),
        "apgd-t": lambda: ta.APGDT(model, steps=config.apgd_steps, n_classes=config.n_classes, **common),
        "fab-t": lambda: ta.FAB(model, steps=config.fab_steps, multi_targeted=True, n_classes=config.n_classes,
                                **common),
        "square": lambda: ta.Square(model, n_queries=config.square_queries, **common),
    }
    out = {}
    for name in config.attacks:
        attack = made[name]()
        if hasattr(attack, "n_target_classes"):
            attack.n_target_classes = config.n_targets  # torchattacks sets classes − 1; the reference uses 9
        out[name] = attack
    return out


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _project(adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """``adv`` put back inside the ε-ball around ``x`` and [0, 1] (guards against attack round-off)."""
    delta = adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * (eps / n).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, config: AutoAttackConfig) -> tuple[Tensor, Tensor]:
    """Worst-case adversarial images ``(N, C, H, W)`` and, per point, the index in ``config.attacks`` of the
    attack that broke it (``-1``: misclassified clean, ``len(attacks)``: robust to all) ``(N,)``."""
    check_images(x)
    if len(x) != len(y):
        raise WeightlabError(f"AutoAttack got {len(x)} images but {len(y)} labels")
    device = next(model.parameters()).device
    x, y = x.detach().to(device), y.detach().to(device)
    final = x.clone()
    broken = torch.full((len(x),), len(config.attacks), dtype=torch.long)
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        robust = (_predict(model, x, config.batch_size) == y).cpu()
        broken[~robust] = -1
        for k, attack in enumerate(build_attacks(model, config).values()):
            idx = torch.nonzero(robust).flatten()
            for start in range(0, len(idx), config.batch_size):
                part = idx[start:start + config.batch_size]
                adv = _project(attack(x[part], y[part]).detach(), x[part], config.eps, config.norm)
                fooled = (_predict(model, adv, config.batch_size) != y[part]).cpu()
                final[part[fooled]] = adv[fooled]
                robust[part[fooled]] = False
                broken[part[fooled]] = k
    return final.cpu(), broken


@dataclass(frozen=True)
class AutoAttackResult:
    """What :func:`autoattack_evaluate` measured on ``n`` points.

    ``correct`` is per point (robust under every attack); ``broken_by`` counts the points each attack broke
    first; standard errors are binomial, ``√(p(1 − p)/n)``.
    """

    n: int
    clean_accuracy: float
    robust_accuracy: float
    per_class: list[float]
    worst_class: float
    tail30: float
    broken_by: dict[str, int]
    correct: list[bool] = field(repr=False)

    @property
    def robust_se(self) -> float:
        return binomial_se(self.robust_accuracy, self.n)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "clean": self.clean_accuracy, "robust": self.robust_accuracy,
                "robust_se": self.robust_se, "per_class": self.per_class, "robust_worst": self.worst_class,
                "robust_tail30": self.tail30, "broken_by": self.broken_by, "correct": self.correct}


def per_class_rate(hits: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """The fraction of ``hits`` ``(N,)`` (bool) in each class of ``y`` ``(N,)`` → ``(num_classes,)`` (NaN: no
    sample of that class)."""
    sums = torch.zeros(num_classes).index_add_(0, y, hits.float())
    counts = torch.bincount(y, minlength=num_classes).float()
    return sums / counts.where(counts > 0, torch.tensor(float("nan")))


def autoattack_evaluate(model: nn.Module, data: DataLike, config: AutoAttackConfig) -> AutoAttackResult:
    """AutoAttack on every point of ``data`` (any dataset of images in [0, 1] or a DataLoader): robust
    accuracy, per class, worst class and the bottom 30% of classes."""
    data = as_array_dataset(data)
    if len(data) == 0:
        raise WeightlabError("cannot run AutoAttack on an empty dataset")
    adv, broken = autoattack(model, data.x, data.y, config)
    correct = broken == len(config.attacks)
    per_class = per_class_rate(correct, data.y, config.n_classes)
    tail = tail_metrics(per_class)
    return AutoAttackResult(
        n=len(data), clean_accuracy=float((broken >= 0).float().mean()), robust_accuracy=float(correct.float().mean()),
        per_class=per_class.tolist(), worst_class=tail["worst"], tail30=tail["tail"],
        broken_by={name: int((broken == k).sum()) for k, name in enumerate(config.attacks)},
        correct=correct.tolist())


def stratified_subset(data: ArrayDataset, per_class: int, *, seed: int = 0) -> ArrayDataset:
    """``per_class`` random points of every class of ``data`` (all of a smaller class), seeded, in index order."""
    if per_class < 1:
        raise WeightlabError(f"per_class must be ≥ 1, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    keep = [idx[torch.randperm(len(idx), generator=gen)[:per_class]]
            for idx in (torch.nonzero(data.y == c).flatten() for c in data.classes)]
    return data.subset(torch.sort(torch.cat(keep)).values)
