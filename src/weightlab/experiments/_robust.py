"""Shared pieces of the robustness experiments (``rift``, ``done``, ``rws``): data splits, corrupted test
sets and the evaluation columns (PGD, and AutoAttack on a stratified test subset). Not an experiment itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from weightlab.data.arrays import ArrayDataset
from weightlab.data.datasets import load_dataset
from weightlab.data.digits import SIZES as DIGIT_SIZES
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, adversarial_predict, tail_metrics
from weightlab.methods.adversarial.autoattack import (
    AutoAttackConfig,
    autoattack_evaluate,
    binomial_se,
    per_class_rate,
    stratified_subset,
)
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy, per_class_accuracy
from weightlab.train.loop import LoopState, TrainConfig, train
from weightlab.utils import derive_seed

RobustData = Literal["fashion-mnist", "digits"]  # digits: the seconds-long smoke profile


def check_image_size(data: RobustData, size: int) -> None:
    """Digits come at a few sizes only; any size is fine for Fashion-MNIST (resized on load)."""
    if data == "digits" and size not in DIGIT_SIZES:
        raise WeightlabError(f"image_size: digits come at sizes {DIGIT_SIZES}, got {size}")


def image_splits(data: RobustData, size: int, *, n_train: int, n_val: int, n_test: int | None = None,
                 seed: int = 0) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """Train, validation and test splits, each balanced: ``n_train`` / ``n_val`` images per class drawn
    (seeded, disjoint) from the official training split, ``n_test`` per class from the test split (None: all
    of it — Fashion-MNIST has 1,000 per class). Digits have fewer: every class keeps what it has."""
    full = load_dataset(data, "train", size=size)
    test = load_dataset(data, "test", size=size)
    gen = torch.Generator().manual_seed(derive_seed(seed, "splits", data))
    train_idx, val_idx = [], []
    for c in full.classes:
        idx = torch.nonzero(full.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held = min(n_val, len(idx) // 5) if data == "digits" else n_val
        val_idx.append(idx[:held])
        train_idx.append(idx[held:held + n_train])
    if n_test is not None:
        test = stratified_subset(test, n_test, seed=derive_seed(seed, "test-subset"))

    def pick(parts: list[torch.Tensor]) -> ArrayDataset:
        return full.subset(torch.sort(torch.cat(parts)).values)

    return pick(train_idx), pick(val_idx), test


def corrupted_sets(
    data: ArrayDataset, names: Sequence[str], severity: int, *, seed: int = 0
) -> dict[str, ArrayDataset]:
    """``{corruption: data with that corruption at severity}`` (``names`` empty: all 15 corruptions)."""
    from weightlab.data.corruptions import CORRUPTIONS, corrupt

    chosen = tuple(names) or CORRUPTIONS
    unknown = [n for n in chosen if n not in CORRUPTIONS]
    if unknown:
        raise WeightlabError(
            f"unknown corruption {unknown[0]!r}; expected names from {', '.join(CORRUPTIONS)}"
        )
    out = {}
    for name in chosen:
        gen = torch.Generator().manual_seed(derive_seed(seed, "corrupt", name, severity))
        out[name] = ArrayDataset(corrupt(data.x, name, severity, generator=gen), data.y, data.t)
    return out


def train_adversarially(
    model: nn.Module,
    data: ArrayDataset,
    callback: Callback,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> LoopState:
    """SGD with a cosine schedule on ``data`` with an adversarial-training ``callback`` (AT, DONE, ...);
    returns the loop's final state (``epoch_losses`` is the training-loss curve)."""
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule="cosine",
        seed=seed,
        description=type(callback).__name__,
    )
    return train(model, data, config, callbacks=[callback])


def mean_accuracy(model: nn.Module, sets: dict[str, ArrayDataset]) -> float:
    """Mean accuracy over several datasets (e.g. the corrupted test sets)."""
    return sum(accuracy(model, d) for d in sets.values()) / max(len(sets), 1)


def robust_summary(
    model: nn.Module, data: ArrayDataset, attack: PGD, *, num_classes: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Clean accuracy and robust accuracy (mean, per class, worst class, bottom 30% of classes) under
    ``attack``, with ``n`` and the binomial standard error of the mean."""
    logits, y = adversarial_predict(model, data, attack, seed=seed)
    per_class = per_class_accuracy(logits, y, num_classes)
    tail = tail_metrics(per_class)
    robust = (logits.argmax(1) == y).float().mean().item()
    return {
        "clean": accuracy(model, data),
        "robust": robust,
        "robust_se": binomial_se(robust, len(y)),
        "n": len(y),
        "per_class": per_class.tolist(),
        "robust_worst": tail["worst"],
        "robust_tail30": tail["tail"],
    }


def autoattack_summary(model: nn.Module, data: ArrayDataset, *, eps: float, per_class: int, pgd: PGD,
                       seed: int = 0, **config: Any) -> dict[str, Any]:
    """AutoAttack (standard, ℓ∞ ``eps``) on ``per_class`` test images of every class, and PGD on the same
    images (so the two can be compared point for point): robust accuracy, its n and standard error,
    per class, worst class and tail-30%; ``{}`` when ``per_class`` is 0."""
    if per_class == 0:
        return {}
    subset = stratified_subset(data, per_class, seed=derive_seed(seed, "autoattack-subset"))
    out = autoattack_evaluate(model, subset, AutoAttackConfig(eps=eps, seed=seed, **config)).to_json()
    logits, y = adversarial_predict(model, subset, pgd, seed=seed)
    pgd_hits = logits.argmax(1) == y
    out["pgd_same_points"] = float(pgd_hits.float().mean())
    out["pgd_per_class_same_points"] = per_class_rate(pgd_hits, y, len(out["per_class"])).tolist()
    out["pgd_robust_aa_broken"] = int((pgd_hits & ~torch.tensor(out["correct"])).sum())  # PGD missed, AA found
    return out


def imbalanced(data: ArrayDataset, ratio: float, *, seed: int = 0) -> ArrayDataset:
    """A long-tailed subset: class ``c`` of ``C`` keeps ``ratio^(−c/(C−1))`` of its samples (≥ 1), so the
    first class keeps all and the last ``1/ratio`` (a random, seeded choice within each class)."""
    if not ratio >= 1:
        raise WeightlabError(f"imbalance ratio must be ≥ 1, got {ratio}")
    classes = data.classes
    gen = torch.Generator().manual_seed(derive_seed(seed, "imbalance"))
    keep = []
    for rank, c in enumerate(classes):
        idx = torch.nonzero(data.y == c).flatten()
        n = max(1, round(len(idx) * ratio ** (-rank / max(len(classes) - 1, 1))))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return data.subset(torch.sort(torch.cat(keep)).values)
