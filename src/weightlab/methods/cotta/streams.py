"""Test-time adaptation streams (paper key ``cotta``): a sequence of corrupted domains.

A stream is a plain list of :class:`Domain` (corruption, severity, round, data). Built from any clean
:class:`ArrayDataset` (the embedded digits by default) with :func:`corrupted`, or from CIFAR-10-C ``.npy``
files with :func:`cifar10c_stream`:

* :func:`continual_stream` — the 15 corruptions in sequence at one severity (CoTTA's main protocol);
* :func:`gradual_stream` — severities going up and down: the first type 5→1, every later type
  1, 2, 3, 4, 5, 4, 3, 2, 1 (``cifar10c_gradual.py``);
* :func:`repeated` — the same stream ``rounds`` times (the 10-round forgetting test).

    stream = repeated(continual_stream(digits("test", size=16), severity=5, seed=0), rounds=10)
    for domain in stream:
        for batch in domain.data.batches(64): logits = tta_model(batch.x)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

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


def corrupted(data: ArrayDataset, corruption: str, severity: int, *, seed: int = 0, chunk: int = 512,
              n: int | None = None) -> ArrayDataset:
    """``data`` (or a seeded random subset of ``n`` images) corrupted by ``corruption`` at ``severity``.

    Images are shuffled with a seed derived from ``(seed, corruption, severity)`` and corrupted in chunks of
    ``chunk`` with a generator derived the same way, so a domain is the same whenever it is rebuilt.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, corruption, severity))
    order = torch.randperm(len(data), generator=g)
    if n is not None:
        if not 1 <= n <= len(data):
            raise WeightlabError(f"n must be between 1 and the {len(data)} images, got {n}")
        order = order[:n]
    x = data.x[order]
    parts = [corrupt(x[i: i + chunk], corruption, severity, generator=g) for i in range(0, len(x), chunk)]
    out = torch.cat(parts)
    return ArrayDataset(out, data.y[order], None if data.t is None else data.t[order])


def continual_stream(data: ArrayDataset, *, severity: int = 5, corruptions: Sequence[str] = CORRUPTIONS,
                     seed: int = 0, n: int | None = None) -> list[Domain]:
    """The corruptions in sequence at one ``severity`` (``n`` images each, default all)."""
    _check_names(corruptions)
    return [Domain(c, severity, corrupted(data, c, severity, seed=seed, n=n)) for c in corruptions]


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
