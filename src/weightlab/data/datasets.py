"""Datasets by name: one function experiments call, ``load_dataset(name, split, size=...)``.

Each dataset registers itself under the registry kind ``"dataset"`` with a :class:`DatasetSpec`; an
experiment's ``data`` config field holds one of these names. ``digits`` (embedded, the data of ``smoke``) is
always available; the real datasets of shared/TESTBED.md resolve from local files (see each spec's loader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from weightlab import registry
from weightlab.data.arrays import ArrayDataset
from weightlab.data.digits import SIZES, digits
from weightlab.errors import WeightlabError

Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: what it is, and ``load(split, size, seed)`` returning an :class:`ArrayDataset`.

    Images are ``(n, channels, size, size)`` floats in ``[0, 1]``; ``size=None`` keeps the native size.
    """

    name: str
    kind: Literal["image", "text"]
    num_classes: int
    native_size: int | None
    licence: str
    summary: str
    load: Callable[[Split, int | None, int], ArrayDataset]


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    registry.register("dataset", spec.name)(spec)
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    return registry.get("dataset", name)


def load_dataset(name: str, split: Split = "train", *, size: int | None = None, seed: int = 0) -> ArrayDataset:
    """The ``split`` of dataset ``name`` (at ``size`` pixels for images); one-line errors name what is missing."""
    if split not in ("train", "test"):
        raise WeightlabError(f"unknown split {split!r}; expected 'train' or 'test'")
    return dataset_spec(name).load(split, size, seed)


def _load_digits(split: Split, size: int | None, seed: int) -> ArrayDataset:
    size = 8 if size is None else size
    if size not in SIZES:
        raise WeightlabError(f"digits come at sizes {SIZES}, got size={size}")
    return digits(split, size=size)


register_dataset(DatasetSpec("digits", "image", 10, 8, "BSD-3-Clause (scikit-learn)",
                             "scikit-learn's 1,797 8×8 digits, embedded (a fixed stratified 80/20 split)",
                             _load_digits))
