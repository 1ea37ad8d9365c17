"""Test-time adaptation streams (paper key ``cotta``): a sequence of corrupted domains.

A stream is a plain list of :class:`Domain` (corruption, severity, round, data). Built from any clean
:class:`ArrayDataset` (the embedded digits by default) with :func:`corrupted`, or from CIFAR-10-C ``.npy``
files with :func:`cifar10c_stream`:

* :func:`continual_stream` — the 15 corruptions in sequence at one severity (CoTTA's main protocol);
* :func:`gradual_stream` — severities going up and down: the first type 5→1, every later type
  1, 2, 3, 4, 5, 4, 3, 2, 1 (``cifar10c_gradual.py``);
* :func:`repeated` — the same stream ``rounds`` times (the 10-round forgetting test);
* ``label_shift=alpha`` (in :func:`corrupted` and :func:`continual_stream`) orders each domain's images by
  :func:`dirichlet_order`, so consecutive batches hold few classes (the non-i.i.d. test stream of NOTE,
  Gong et al., NeurIPS'22, and RoTTA, Yuan et al., CVPR'23); ``draws=k`` corrupts every chosen image ``k``
  times with independent draws (a longer stream from a small test set).

    stream = repeated(continual_stream(digits("test", size=16), severity=5, seed=0), rounds=10)
    for domain in stream:
        for batch in domain.data.batches(64): logits = tta_model(batch.x)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weightlab.data.arrays import ArrayDataset
from weightlab.data.corruptions import CORRUPTIONS, corrupt
from weightlab.data.local import load_cifar10c
from weightlab.errors import WeightlabError
from weightlab.utils import derive_seed


@dataclass(frozen=True)
class Domain:
    """One stretch of a stream: ``data`` corrupted by ``corruption`` at ``severity``, in round ``round``."""

    corruption: str
    severity: int
    data: ArrayDataset
    round: int = 0

    @property
    def name(self) -> str:
        return f"{self.corruption}-{self.severity}"


def _check_names(corruptions: Sequence[str]) -> None:
    for name in corruptions:
        if name not in CORRUPTIONS:
            raise WeightlabError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")
    if not corruptions:
        raise WeightlabError("a stream needs at least one corruption")


def dirichlet_order(labels: Tensor, alpha: float, *, slots: int, seed: int) -> Tensor:
    """A permutation of ``labels`` ``(N,)`` in which classes arrive unevenly over time: the stream is cut into
    ``slots`` consecutive slots, each class spreads its images over the slots in proportions drawn from
    ``Dirichlet(alpha·1)``, and each slot is shuffled. Small ``alpha`` (0.1) puts most of a class in one or two
    slots; large ``alpha`` tends to the i.i.d. order (NOTE's non-i.i.d. stream)."""
    if not alpha > 0:
        raise WeightlabError(f"label_shift (the Dirichlet concentration) must be > 0, got {alpha}")
    if slots < 1:
        raise WeightlabError(f"slots must be ≥ 1, got {slots}")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    slot_of = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        counts = rng.multinomial(len(members), rng.dirichlet(np.full(slots, alpha)))
        slot_of[members] = np.repeat(np.arange(slots), counts)
    key = slot_of + rng.random(len(y))  # the slot, then a random order inside it
    return torch.from_numpy(np.argsort(key, kind="stable"))


def corrupted(data: ArrayDataset, corruption: str, severity: int, *, seed: int = 0, chunk: int = 512,
              n: int | None = None, draws: int = 1, label_shift: float | None = None,
              slot_size: int = 64) -> ArrayDataset:
    """``data`` (or a seeded random subset of ``n`` images) corrupted by ``corruption`` at ``severity``.

    Images are shuffled with a seed derived from ``(seed, corruption, severity)`` and corrupted in chunks of
    ``chunk`` with a generator derived the same way, so a domain is the same whenever it is rebuilt.

    Args:
        draws: corrupt each chosen image this many times, with independent draws (``draws·n`` images).
        label_shift: order the images by :func:`dirichlet_order` with this concentration (slots of
            ``slot_size`` images, i.e. one batch); None keeps the shuffled (i.i.d.) order.
    """
    if draws < 1:
        raise WeightlabError(f"draws must be ≥ 1, got {draws}")
    g = torch.Generator().manual_seed(derive_seed(seed, corruption, severity))
    order = torch.randperm(len(data), generator=g)
    if n is not None:
        if not 1 <= n <= len(data):
            raise WeightlabError(f"n must be between 1 and the {len(data)} images, got {n}")
        order = order[:n]
    order = order.repeat(draws)
    order = order[torch.randperm(len(order), generator=g)] if draws > 1 else order
    if label_shift is not None:
        slots = max(1, -(-len(order) // slot_size))
        order = order[dirichlet_order(data.y[order], label_shift, slots=slots,
                                      seed=derive_seed(seed, corruption, severity, "label_shift"))]
    x = data.x[order]
    parts = [corrupt(x[i: i + chunk], corruption, severity, generator=g) for i in range(0, len(x), chunk)]
    out = torch.cat(parts)
    return ArrayDataset(out, data.y[order], None if data.t is None else data.t[order])


def continual_stream(data: ArrayDataset, *, severity: int = 5, corruptions: Sequence[str] = CORRUPTIONS,
                     seed: int = 0, n: int | None = None, draws: int = 1, label_shift: float | None = None,
                     slot_size: int = 64) -> list[Domain]:
    """The corruptions in sequence at one ``severity`` (``n`` images each, default all; ``draws`` and
    ``label_shift`` as in :func:`corrupted`)."""
    _check_names(corruptions)
    return [Domain(c, severity, corrupted(data, c, severity, seed=seed, n=n, draws=draws, label_shift=label_shift,
                                          slot_size=slot_size)) for c in corruptions]


def gradual_severities(index: int) -> tuple[int, ...]:
    """Severities of the ``index``-th corruption in the gradual protocol."""
    return (5, 4, 3, 2, 1) if index == 0 else (1, 2, 3, 4, 5, 4, 3, 2, 1)


def gradual_stream(data: ArrayDataset, *, corruptions: Sequence[str] = CORRUPTIONS, seed: int = 0,
                   n: int | None = None) -> list[Domain]:
    """Severity up and down within every corruption (see :func:`gradual_severities`)."""
    _check_names(corruptions)
    return [Domain(c, s, corrupted(data, c, s, seed=seed, n=n))
            for i, c in enumerate(corruptions) for s in gradual_severities(i)]


def repeated(stream: list[Domain], rounds: int) -> list[Domain]:
    """``stream`` repeated ``rounds`` times (the data is shared; ``Domain.round`` counts from 0)."""
    if rounds < 1:
        raise WeightlabError(f"rounds must be ≥ 1, got {rounds}")
    return [replace(d, round=r) for r in range(rounds) for d in stream]


def cifar10c_stream(root: str | Path, *, severity: int = 5, corruptions: Sequence[str] = CORRUPTIONS,
                    n: int | None = None) -> list[Domain]:
    """The continual stream from CIFAR-10-C ``.npy`` files in ``root`` (``n`` first images per type, as
    RobustBench's ``load_cifar10c(n_examples, ...)`` without shuffling)."""
    _check_names(corruptions)
    stream = []
    for c in corruptions:
        data = load_cifar10c(root, c, severity)
        if n is not None:
            data = data.subset(torch.arange(min(n, len(data))))
        stream.append(Domain(c, severity, data))
    return stream
