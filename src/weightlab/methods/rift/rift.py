"""RiFT: robust critical fine-tuning (paper key ``rift``; Zhu et al., ICCV 2023).

1. **Module robust criticality** (MRC, Def. 3.1): for each conv/linear weight ``W``, the largest rise of the
   robust loss on a *fixed* set of adversarial examples when only ``W`` moves inside the relative ball
   ``‖ΔW‖₂ ≤ ε‖W‖₂`` (ε = 0.1), found by gradient ascent (SGD, lr 1) with a projection after each epoch, as in
   ``microsoft/robustlearn:RiFT`` (the maximum over epochs counts; BN and biases are never candidates).
2. **Fine-tune** only the module with the lowest MRC on clean data (the one training loop, everything else
   frozen; BatchNorm running statistics move in train mode, as in the reference).
3. **Interpolate** ``θ_α = (1 − α)·θ_AT + α·θ_FT`` over the whole state dict and keep the α with the best
   clean accuracy whose robust accuracy stays within ``tolerance`` of ``θ_AT``'s.

    mrc = module_robust_criticality(model, adversarial_dataset(model, val, PGD(eps=0.1)))
    rift = RiFT(RiFTConfig(finetune=TrainConfig(epochs=10, lr=1e-3))).fit(model, train, val, attack)
    rift.model_, rift.alpha_, rift.module_
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, DataLike, as_array_dataset
from weightlab.errors import WeightlabError, closest
from weightlab.methods.adversarial.attacks import PGD, adversarial_dataset, adversarial_predict, check_images, eval_mode
from weightlab.registry import register
from weightlab.train.evaluate import accuracy
from weightlab.train.loop import TrainConfig, train

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def weight_modules(model: nn.Module) -> list[str]:
    """Names of the ``Conv*d`` and ``Linear`` modules of ``model``: the RiFT candidates, in module order."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name
    ]


def check_module(model: nn.Module, module: str) -> None:
    """Raise :class:`WeightlabError` naming the valid candidates unless ``module`` is one of them."""
    valid = weight_modules(model)
    if module not in valid:
        raise WeightlabError(
            f"module {module!r} is not a conv/linear module of {type(model).__name__}; valid: "
            f"{', '.join(valid)} (closest: {', '.join(closest(module, valid))})"
        )


def _mean_loss(model: nn.Module, data: ArrayDataset, batch_size: int) -> float:
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for b in data.batches(batch_size):
            total += F.cross_entropy(model(b.x.to(device)), b.y.to(device), reduction="sum").item()
    return total / len(data)


def module_robust_criticality(
    model: nn.Module,
    adversarial_data: DataLike,
    *,
    modules: Sequence[str] | None = None,
    radius: float = 0.1,
    epochs: int = 10,
    lr: float = 1.0,
    batch_size: int = 512,
) -> dict[str, float]:
    """MRC of each conv/linear weight: ``max_ΔW L(θ + ΔW; D_adv) − L(θ; D_adv)`` with ``‖ΔW‖ ≤ radius·‖W‖``.

    Args:
        model: the adversarially trained model (not modified; each module is perturbed on a copy).
        adversarial_data: a fixed set of adversarial examples of ``model`` (:func:`adversarial_dataset`): any
            dataset of ``(x, y)`` samples or a DataLoader (read once into memory).
        modules: which modules to measure (default: all of :func:`weight_modules`).
        radius: ε of the relative ℓ2 ball (0.1 in the paper).
        epochs: gradient-ascent epochs over ``adversarial_data`` (10).
        lr: SGD step of the ascent (1.0).

    Returns:
        ``{module name: MRC}`` in module order (a loss difference ≥ 0).
    """
    if not radius > 0:
        raise WeightlabError(f"MRC radius must be > 0, got {radius}")
    if epochs < 1:
        raise WeightlabError(f"MRC epochs must be ≥ 1, got {epochs}")
    adversarial_data = as_array_dataset(adversarial_data)
    check_images(adversarial_data.x, name="adversarial_data.x")
    names = list(modules) if modules is not None else weight_modules(model)
    for name in names:
        check_module(model, name)
    with eval_mode(model):
        base = _mean_loss(model, adversarial_data, batch_size)
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for name in names:
        probe = copy.deepcopy(model).eval()
        probe.requires_grad_(False)
        weight: Tensor = probe.get_submodule(name).weight
        weight.requires_grad_(True)
        start = weight.detach().clone()
        optimizer = torch.optim.SGD([weight], lr=lr)
        best = base
        for _ in range(epochs):
            for b in adversarial_data.batches(batch_size):
                loss = -F.cross_entropy(probe(b.x.to(device)), b.y.to(device))  # ascent on the robust loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                delta = weight - start
                ratio = (delta.norm() / start.norm().clamp_min(1e-12)).item()
                if ratio > radius:
                    weight.copy_(start + delta * (radius / ratio))
            best = max(best, _mean_loss(probe, adversarial_data, batch_size))
        out[name] = best - base
    return out


def interpolate(start: dict[str, Tensor], end: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 − α)·start + α·end`` for floating tensors; integer buffers (BN's step count) come from ``end``
    when α ≥ 0.5, else from ``start``."""
    missing = sorted(set(start) ^ set(end))
    if missing:
        raise WeightlabError(f"state dicts differ in {len(missing)} keys (first: {missing[0]!r})")
    return {
        k: torch.lerp(v, end[k], alpha)
        if v.is_floating_point()
        else (end[k] if alpha >= 0.5 else v).clone()
        for k, v in start.items()
    }


def freeze_except(model: nn.Module, module: str | None) -> None:
    """Make only ``module``'s parameters trainable (all of them when ``module`` is None)."""
    if module is None:
        model.requires_grad_(True)
        return
    check_module(model, module)
    model.requires_grad_(False)
    model.get_submodule(module).requires_grad_(True)


@dataclass(frozen=True)
class RiFTConfig:
    """RiFT settings (paper key ``rift``); defaults follow ``microsoft/robustlearn:RiFT`` where they scale.

    Args:
        radius, mrc_epochs, mrc_lr: the MRC ball (relative ε = 0.1), ascent epochs (10) and step (1.0).
        finetune: the clean fine-tuning run (reference: SGD lr 1e-3, momentum 0.9, wd 5e-4, 10 epochs).
        alphas: the interpolation grid (0, 0.1, ..., 1).
        tolerance: robust accuracy may drop at most this much (fraction; the paper keeps it within 0.1 pt).
        module: fine-tune this module instead of the one with the lowest MRC (None: the lowest).
        candidates: choose the least critical module among these only (None: every conv/linear module);
            the authors advise middle layers, e.g. leaving out the classifier.
    """

    radius: float = 0.1
    mrc_epochs: int = 10
    mrc_lr: float = 1.0
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=10, batch_size=128, lr=1e-3, momentum=0.9, weight_decay=5e-4, schedule="step"
        )
    )
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    tolerance: float = 0.001
    module: str | None = None
    candidates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.radius > 0:
            raise WeightlabError(f"RiFT radius must be > 0, got {self.radius}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise WeightlabError(f"RiFT alphas must be a non-empty list in [0, 1], got {self.alphas}")
        if self.tolerance < 0:
            raise WeightlabError(f"RiFT tolerance must be ≥ 0, got {self.tolerance}")


Evaluator = Callable[[nn.Module], tuple[float, float]]


def robust_evaluator(data: DataLike, attack: PGD, *, seed: int = 0) -> Evaluator:
    """``model -> (clean accuracy, robust accuracy under attack)`` on ``data``."""

    def evaluate(model: nn.Module) -> tuple[float, float]:
        logits, y = adversarial_predict(model, data, attack, seed=seed)
        return accuracy(model, data), (logits.argmax(1) == y).float().mean().item()

    return evaluate


def interpolation_search(
    model: nn.Module,
    start: dict[str, Tensor],
    end: dict[str, Tensor],
    evaluate: Evaluator,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tolerance: float = 0.001,
) -> tuple[float, list[dict[str, float]]]:
    """The α of the best clean accuracy among those whose robust accuracy ≥ robust(α = 0) − ``tolerance``.

    ``model`` is loaded with every ``θ_α`` in turn and left holding the chosen one. Returns the chosen α and a
    row ``{alpha, clean, robust}`` per α (α = 0 is always evaluated: it is the reference).
    """
    grid = sorted({0.0, *alphas})
    rows = []
    for alpha in grid:
        model.load_state_dict(interpolate(start, end, alpha))
        clean, robust = evaluate(model)
        rows.append({"alpha": alpha, "clean": clean, "robust": robust})
    floor = rows[0]["robust"] - tolerance
    ok = [r for r in rows if r["robust"] >= floor - 1e-12]
    best = max(ok, key=lambda r: (r["clean"], -r["alpha"]))
    model.load_state_dict(interpolate(start, end, best["alpha"]))
    return best["alpha"], rows


@register("method", "rift")
class RiFT:
    """Robust critical fine-tuning (paper key ``rift``) in scikit-learn form: ``fit`` sets ``mrc_``,
    ``module_``, ``alpha_``, ``search_`` and ``model_`` (the interpolated model; the input is untouched)."""

    def __init__(self, config: RiFTConfig = RiFTConfig()) -> None:
        self.config = config

    def fit(
        self,
        model: nn.Module,
        train_data: DataLike,
        val_data: DataLike,
        attack: PGD,
        *,
        adversarial_data: DataLike | None = None,
        mrc: dict[str, float] | None = None,
        seed: int = 0,
    ) -> RiFT:
        """Measure MRC on ``adversarial_data`` (default: ``attack`` on ``val_data``), fine-tune the least
        critical module on clean ``train_data``, and pick α on ``val_data`` (each any dataset of
        ``(x, y)`` samples or a DataLoader). ``mrc``: reuse an MRC measured on this model (the ``mrc_`` of an
        earlier fit with the same radius and epochs) instead of measuring it again."""
        cfg = self.config
        for name in ([cfg.module] if cfg.module else []) + list(cfg.candidates or ()) + list(mrc or ()):
            check_module(model, name)
        if mrc is not None:
            self.mrc_ = dict(mrc)
        else:
            if adversarial_data is None:
                adversarial_data = adversarial_dataset(model, val_data, attack, seed=seed)
            self.mrc_ = module_robust_criticality(
                model, adversarial_data, radius=cfg.radius, epochs=cfg.mrc_epochs, lr=cfg.mrc_lr
            )
        pool = cfg.candidates or tuple(self.mrc_)
        if not set(pool) <= set(self.mrc_):
            raise WeightlabError(f"mrc has no value for candidate {sorted(set(pool) - set(self.mrc_))[0]!r}")
        self.module_ = cfg.module or min(pool, key=self.mrc_.__getitem__)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tuned = finetune(model, train_data, self.module_, cfg.finetune)
        self.model_ = tuned
        self.alpha_, self.search_ = interpolation_search(
            tuned,
            start,
            {k: v.detach().clone() for k, v in tuned.state_dict().items()},
            robust_evaluator(val_data, attack, seed=seed),
            alphas=cfg.alphas,
            tolerance=cfg.tolerance,
        )
        return self


def finetune(model: nn.Module, data: DataLike, module: str | None, config: TrainConfig) -> nn.Module:
    """A copy of ``model`` fine-tuned on clean ``data`` with only ``module`` trainable (None: all layers)."""
    tuned = copy.deepcopy(model)
    freeze_except(tuned, module)
    train(tuned, data, config)
    tuned.requires_grad_(True)
    return tuned.train(model.training)  # the loop leaves it in train mode; hand it back as it came
