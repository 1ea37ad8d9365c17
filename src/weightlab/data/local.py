"""Real datasets from a local folder the user gives (nothing is downloaded here).

* MNIST: the four idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-…``), gzipped
  or not, in ``root`` or ``root/MNIST/raw`` (torchvision's layout);
* CIFAR-10/100: the python batches (``cifar-10-batches-py/data_batch_1..5, test_batch``;
  ``cifar-100-python/train, test``), read with an unpickler that only admits NumPy arrays and builtins;
* ImageFolder: ``root/<class>/<image>``, resized to a square size;
* CIFAR-10-C: ``root/<corruption>.npy`` (50,000 images, 10,000 per severity 1..5) and ``root/labels.npy``.

A missing or malformed file raises :class:`~weightlab.errors.FormatError` naming the file and the format.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import FormatError, WeightlabError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        for cand in (root / name, root / "MNIST" / "raw" / name):
            if cand.is_file():
                return cand
    raise FormatError(f"{what}: none of {names} found in {str(root)!r}")


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped) into an array; the magic number fixes dtype and rank."""
    return parse_idx(read_bytes(path), path)


def read_bytes(path: Path) -> bytes:
    """The content of a file, decompressed when its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise FormatError(f"{str(path)!r}: cannot read ({exc}); expected an idx file, gzipped or not") from None


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """The array in the idx bytes ``data`` read from ``path`` (named in errors)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise FormatError(f"{str(path)!r} is not an idx file of unsigned bytes (expected magic 0x0000 08 NN)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FormatError(f"{str(path)!r}: idx header truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise FormatError(f"{str(path)!r}: idx header says {shape} but the file holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(root: str | Path, split: str = "train") -> ArrayDataset:
    """MNIST (or Fashion-MNIST, same format) from idx files as ``(N, 1, 28, 28)`` floats in [0, 1]."""
    root = Path(root)
    if split not in MNIST_FILES:
        raise WeightlabError(f"split must be 'train' or 'test', got {split!r}")
    img_name, lbl_name = MNIST_FILES[split]
    images = read_idx(_find(root, [img_name, img_name + ".gz"], "MNIST images"))
    labels = read_idx(_find(root, [lbl_name, lbl_name + ".gz"], "MNIST labels"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise FormatError(f"MNIST in {str(root)!r}: images {images.shape} and labels {labels.shape} do not match "
                          "(expected (N, H, W) and (N,))")
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
    return ArrayDataset(x, torch.from_numpy(labels.astype(np.int64)))


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batches contain: builtins and NumPy arrays (no arbitrary code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(path: Path) -> dict:
    if not path.is_file():
        raise FormatError(f"CIFAR batch {str(path)!r} not found (expected the python version of the dataset)")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a format error
        raise FormatError(f"{str(path)!r} is not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise FormatError(f"{str(path)!r} is not a CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar(root: str | Path, split: str = "train", *, classes: int = 10) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 (``classes=100``, fine labels) as ``(N, 3, 32, 32)`` floats in [0, 1]."""
    root = Path(root)
    if classes not in (10, 100):
        raise WeightlabError(f"classes must be 10 or 100, got {classes}")
    sub = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    base = sub if sub.is_dir() else root
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        names, label_key = [split], "fine_labels"
    xs, ys = [], []
    for name in names:
        batch = _load_batch(base / name)
        if "data" not in batch or label_key not in batch:
            raise FormatError(f"{str(base / name)!r} lacks 'data' or {label_key!r} (expected a CIFAR python batch)")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise FormatError(f"{str(base / name)!r}: data has shape {data.shape}, expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255)
    return ArrayDataset(x, torch.from_numpy(np.concatenate(ys)))


def load_image_folder(root: str | Path, *, size: int = 32, grayscale: bool = False) -> ArrayDataset:
    """An ImageFolder tree (``root/<class>/<image>``) loaded into memory, resized to ``size``×``size``."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"ImageFolder {str(root)!r} does not exist (expected root/<class>/<image files>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise FormatError(f"ImageFolder {str(root)!r} has no class folders (expected root/<class>/<image files>)")
    xs, ys = [], []
    for label, cdir in enumerate(class_dirs):
        for file in sorted(p for p in cdir.iterdir() if p.is_file()):
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if grayscale else "RGB").resize((size, size))
                    arr = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise FormatError(f"{str(file)!r} is not a readable image ({exc})") from None
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise FormatError(f"ImageFolder {str(root)!r} has class folders but no images")
    return ArrayDataset(torch.from_numpy(np.stack(xs)).float().div_(255), torch.tensor(ys))


def load_cifar10c(root: str | Path, corruption: str, severity: int) -> ArrayDataset:
    """One corruption at one severity (1–5) from CIFAR-10-C ``.npy`` files."""
    root = Path(root)
    if severity not in range(1, 6):
        raise WeightlabError(f"severity must be in 1..5, got {severity}")
    images = _load_npy(root / f"{corruption}.npy", "uint8 array (N, 32, 32, 3), N = 5 × 10,000 per severity")
    labels = _load_npy(root / "labels.npy", "integer array (N,)")
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) % 5 or len(labels) != len(images):
        raise FormatError(f"{str(root / (corruption + '.npy'))!r} has shape {images.shape} with {len(labels)} labels; "
                          "expected (5·n, H, W, 3) and as many labels")
    n = len(images) // 5
    part = slice((severity - 1) * n, severity * n)
    x = torch.from_numpy(np.ascontiguousarray(images[part].transpose(0, 3, 1, 2))).float().div_(255)
    return ArrayDataset(x, torch.from_numpy(labels[part].astype(np.int64)))


def _load_npy(path: Path, expected: str) -> np.ndarray:
    if not path.is_file():
        raise FormatError(f"{str(path)!r} not found (expected a .npy {expected})")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FormatError(f"{str(path)!r} is not a .npy {expected} ({exc})") from None
