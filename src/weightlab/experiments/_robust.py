"""Shared pieces of the robustness experiments (``rift``, ``done``, ``rws``): data splits, corrupted test
sets and the evaluation columns. Not an experiment itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weightlab.data.arrays import ArrayDataset, stratified_split
from weightlab.data.digits import digits
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, adversarial_predict, tail_metrics
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy, per_class_accuracy
from weightlab.train.loop import TrainConfig, train
from weightlab.utils import derive_seed


def digit_splits(size: int, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ...]:
    """Train, validation (a stratified ``val_fraction`` of the training split) and test digits."""
    full = digits("train", size=size)
    keep, held = stratified_split(full.y, val_fraction, generator=torch.Generator().manual_seed(seed))
    return full.subset(keep), full.subset(held), digits("test", size=size)


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
) -> None:
    """SGD with a cosine schedule on ``data`` with an adversarial-training ``callback`` (AT, DONE, ...)."""
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule="cosine",
        seed=seed,
        description=type(callback).__name__,
    )
    train(model, data, config, callbacks=[callback])


def mean_accuracy(model: nn.Module, sets: dict[str, ArrayDataset]) -> float:
    """Mean accuracy over several datasets (e.g. the corrupted test sets)."""
    return sum(accuracy(model, d) for d in sets.values()) / max(len(sets), 1)


def robust_summary(
    model: nn.Module, data: ArrayDataset, attack: PGD, *, num_classes: int = 10, seed: int = 0
) -> dict[str, float]:
    """Clean accuracy and robust accuracy (mean, worst class, bottom 30% of classes) under ``attack``."""
    logits, y = adversarial_predict(model, data, attack, seed=seed)
    tail = tail_metrics(per_class_accuracy(logits, y, num_classes))
    return {
        "clean": accuracy(model, data),
        "robust": (logits.argmax(1) == y).float().mean().item(),
        "robust_worst": tail["worst"],
        "robust_tail30": tail["tail"],
    }


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
