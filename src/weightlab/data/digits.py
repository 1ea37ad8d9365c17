"""The embedded default data: scikit-learn's digits (1,797 8×8 images, 10 classes) and what derives from it.

Everything here is seeded and cached. The derivations:

* :func:`digits` — the original 8×8 images or bilinear upsamplings (16×16, 28×28, 32×32), split once into a
  stratified train/test partition (a fixed 20% test set for every seed of the split);
* ``augment_to=N`` — an affine-augmented enlargement of the *training* part to ``N`` images (random
  rotation, scale, shear and translation via :func:`torch.nn.functional.affine_grid`), cached as safetensors
  under ``$WEIGHTLAB_CACHE`` (default ``~/.cache/weightlab``). The test part is never augmented.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.data.arrays import ArrayDataset, stratified_split
from weightlab.errors import WeightlabError

SIZES = (8, 16, 28, 32)
TEST_FRACTION = 0.2


def cache_dir() -> Path:
    """Where derived data is cached: ``$WEIGHTLAB_CACHE`` or ``~/.cache/weightlab``."""
    return Path(os.environ.get("WEIGHTLAB_CACHE", Path.home() / ".cache" / "weightlab"))


def _raw_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``(N, C, H, W)`` images to ``size``×``size``, clamped to [0, 1]."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def random_affine(x: Tensor, *, generator: torch.Generator, max_rotation: float = 15.0,
                  scale: tuple[float, float] = (0.9, 1.1), max_shear: float = 10.0,
                  max_translate: float = 0.1) -> Tensor:
    """A random affine transform per image of ``x`` ``(N, C, H, W)`` (angles in degrees, translate in
    fractions of the image side). Batched: one ``affine_grid`` and one ``grid_sample`` call."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    rot = torch.deg2rad(uniform(-max_rotation, max_rotation))
    shear = torch.deg2rad(uniform(-max_shear, max_shear))
    s = uniform(*scale)
    tx, ty = uniform(-2 * max_translate, 2 * max_translate), uniform(-2 * max_translate, 2 * max_translate)
    cos, sin = torch.cos(rot), torch.sin(rot)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / s
    theta[:, 0, 1] = (-sin + torch.tan(shear) * cos) / s
    theta[:, 1, 0] = sin / s
    theta[:, 1, 1] = (cos + torch.tan(shear) * sin) / s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


def digits(split: str = "train", *, size: int = 8, augment_to: int | None = None, seed: int = 0) -> ArrayDataset:
    """scikit-learn's digits as an :class:`ArrayDataset` of ``(N, 1, size, size)`` images in [0, 1].

    Args:
        split: ``"train"`` (80%) or ``"test"`` (20%, stratified, the same for every ``seed``).
        size: image side: 8 (original), 16, 28 or 32 (bilinear upsampling).
        augment_to: enlarge the training split to this many images with random affine transforms
            (the originals first, then augmented copies); cached on disk.
        seed: seed of the augmentation.
    """
    if split not in {"train", "test"}:
        raise WeightlabError(f"split must be 'train' or 'test', got {split!r}")
    if size not in SIZES:
        raise WeightlabError(f"digits size must be one of {SIZES}, got {size!r}")
    x, y = _raw_digits()
    train_idx, test_idx = stratified_split(y, TEST_FRACTION, generator=torch.Generator().manual_seed(1234))
    idx = train_idx if split == "train" else test_idx
    x, y = resize(x[idx], size), y[idx]
    if augment_to is None or split == "test":
        return ArrayDataset(x, y)
    if augment_to < len(y):
        raise WeightlabError(f"augment_to must be ≥ the {len(y)} training images, got {augment_to}")
    if augment_to == len(y):
        return ArrayDataset(x, y)
    return ArrayDataset(*_augmented(x, y, size=size, n=augment_to, seed=seed))


def _augmented(x: Tensor, y: Tensor, *, size: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    from weightlab.weights.io import load_tensors, save_tensors

    path = cache_dir() / f"digits-aug-s{size}-n{n}-seed{seed}.safetensors"
    if path.is_file():
        try:
            cached = load_tensors(path)
            return cached["x"], cached["y"]
        except WeightlabError:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt
    gen = torch.Generator().manual_seed(seed)
    reps = math.ceil((n - len(y)) / len(y))
    extra_x = torch.cat([random_affine(x, generator=gen) for _ in range(reps)])[: n - len(y)]
    extra_y = y.repeat(reps)[: n - len(y)]
    out_x, out_y = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    save_tensors({"x": out_x, "y": out_y}, path)
    return out_x, out_y
