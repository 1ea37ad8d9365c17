"""The image tasks of ``tall-masks`` and their cached trunk features on the pretrained EfficientNet-Lite0.

Fifteen tasks built from the offline datasets (``fashion-mnist``, ``mnist-5k``, ``digits``): the datasets
themselves and tasks derived from them by a label grouping (Fashion-MNIST in four garment groups, MNIST
parity, MNIST ≥ 5) or a domain change (inversion, a 90° rotation, a corruption of
:mod:`weightlab.data.corruptions`). The first eight are the 8-task benchmark, the first fourteen the 14-task
one, and the three digits tasks the smoke one.
Tasks built from Fashion-MNIST take disjoint chunks of its training and test images; the MNIST and digits
tasks share their (few) source images, each with its own transform or labels.

The network is split at ``CUT``: the *trunk* (stem and blocks 0–5, frozen) runs once per image and its
features ``(N, 192, s/32, s/32)`` are cached under ``cache_dir()/features`` as safetensors, so every seed and
every later run reuses them; the *tail* (block 6, ``conv_head``, ``bn2``: 1.0M of the 4.65M parameters) is
what is fine-tuned and merged. Inputs: the 28×28 grey images (digits upsampled), resized to ``image_size``
and normalized as the network expects (:func:`weightlab.models.pretrained.preprocess`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data import ArrayDataset, load_dataset, stratified_split
from weightlab.data.corruptions import corrupt
from weightlab.data.digits import cache_dir
from weightlab.errors import WeightlabError

CUT = 6  # blocks[:CUT] are the frozen trunk, blocks[CUT:] + conv_head + bn2 the fine-tuned tail
DIGITS_TEST = 1000  # the digits tasks hold out 1,000 of the 1,797 images for test (stratified, fixed)
Source = Literal["fashion-mnist", "mnist-5k", "digits"]


def _corrupted(name: str, severity: int) -> Callable[[Tensor, int], Tensor]:
    return lambda x, seed: corrupt(x, name, severity, generator=torch.Generator().manual_seed(seed))


TRANSFORMS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "none": lambda x, seed: x,
    "invert": lambda x, seed: 1 - x,
    "rotate90": lambda x, seed: torch.rot90(x, 1, dims=(-2, -1)),
    "impulse-noise": _corrupted("impulse_noise", 5),
    "fog": _corrupted("fog", 5),
    "defocus-blur": _corrupted("defocus_blur", 5),
}
GROUPS = {  # label maps: Fashion-MNIST tops / trousers+dresses / footwear / bags; parity; ≥ 5
    "fashion-groups": (0, 1, 0, 1, 0, 2, 0, 2, 3, 2),
    "parity": (0, 1, 0, 1, 0, 1, 0, 1, 0, 1),
    "geq5": (0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
}


@dataclass(frozen=True)
class ImageTask:
    """A task: its source dataset, a pixel transform, a label map (None: the source's labels) and, for
    Fashion-MNIST, which disjoint chunk of the source's images it takes."""

    name: str
    source: Source
    transform: str = "none"
    labels: str | None = None
    chunk: int = 0

    @property
    def classes(self) -> int:
        return 10 if self.labels is None else max(GROUPS[self.labels]) + 1


IMAGE_TASKS: dict[str, ImageTask] = {t.name: t for t in (
    ImageTask("fashion", "fashion-mnist", chunk=0),
    ImageTask("mnist", "mnist-5k"),
    ImageTask("digits", "digits"),
    ImageTask("fashion-groups", "fashion-mnist", labels="fashion-groups", chunk=1),
    ImageTask("mnist-inverted", "mnist-5k", "invert"),
    ImageTask("fashion-rotated", "fashion-mnist", "rotate90", chunk=2),
    ImageTask("mnist-parity", "mnist-5k", labels="parity"),
    ImageTask("fashion-noise", "fashion-mnist", "impulse-noise", chunk=3),
    ImageTask("digits-inverted", "digits", "invert"),
    ImageTask("mnist-rotated", "mnist-5k", "rotate90"),
    ImageTask("fashion-inverted", "fashion-mnist", "invert", chunk=4),
    ImageTask("mnist-fog", "mnist-5k", "fog"),
    ImageTask("fashion-blur", "fashion-mnist", "defocus-blur", chunk=5),
    ImageTask("mnist-geq5", "mnist-5k", labels="geq5"),
    ImageTask("digits-rotated", "digits", "rotate90"),  # with digits and digits-inverted: the smoke tasks
)}
TaskName = Literal[
    "fashion", "mnist", "digits", "fashion-groups", "mnist-inverted", "fashion-rotated", "mnist-parity",
    "fashion-noise", "digits-inverted", "mnist-rotated", "fashion-inverted", "mnist-fog", "fashion-blur",
    "mnist-geq5", "digits-rotated",
]
TASKS_8: tuple[TaskName, ...] = ("fashion", "mnist", "digits", "fashion-groups", "mnist-inverted",
                                 "fashion-rotated", "mnist-parity", "fashion-noise")
TASKS_14: tuple[TaskName, ...] = (*TASKS_8, "digits-inverted", "mnist-rotated", "fashion-inverted", "mnist-fog",
                                  "fashion-blur", "mnist-geq5")
TASKS_DIGITS: tuple[TaskName, ...] = ("digits", "digits-inverted", "digits-rotated")
SOURCES: tuple[Source, ...] = ("fashion-mnist", "mnist-5k", "digits")


def _digits_all() -> tuple[ArrayDataset, ArrayDataset]:
    """All 1,797 digits at 28 px, split into a pool and a fixed stratified test set of ``DIGITS_TEST``."""
    from weightlab.data import concat

    full = concat([load_dataset("digits", "train", size=28), load_dataset("digits", "test", size=28)])
    pool, test = stratified_split(full.y, DIGITS_TEST / len(full.y), generator=torch.Generator().manual_seed(0))
    return full.subset(pool), full.subset(test)


def task_images(task: ImageTask, *, n_pool: int, n_test: int) -> tuple[ArrayDataset, ArrayDataset]:
    """The task's training pool (train + validation, at most ``n_pool``) and test images, 28×28 in [0, 1]."""
    if task.source == "digits":
        pool, test = _digits_all()
    else:
        pool, test = load_dataset(task.source, "train"), load_dataset(task.source, "test")
    # a fixed permutation of each source (its files may be ordered by class); Fashion-MNIST's tasks take
    # disjoint chunks of it
    pool = pool.subset(torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
                       [task.chunk * n_pool:(task.chunk + 1) * n_pool])
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
                       [task.chunk * n_test:(task.chunk + 1) * n_test])
    if len(test) < n_test:
        raise WeightlabError(f"task {task.name}: {task.source} has {len(test)} test images, fewer than n_test={n_test}")
    out = []
    for part, salt in ((pool, 0), (test, 1)):
        x = TRANSFORMS[task.transform](part.x, 1000 * task.chunk + salt)
        out.append(ArrayDataset(x.clamp(0, 1), task_labels(task, part.y)))
    return out[0], out[1]


def task_labels(task: ImageTask, y: Tensor) -> Tensor:
    """The task's labels of source labels ``y`` (its grouping, or ``y`` itself)."""
    return y if task.labels is None else torch.tensor(GROUPS[task.labels])[y]


def split_lite0(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The frozen trunk (stem, bn1, blocks[:CUT]) and the tail (blocks[CUT:], conv_head, bn2, average pool)
    of a timm EfficientNet, sharing the model's modules; both in eval mode."""
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:CUT]).eval()
    tail = nn.Sequential(*model.blocks[CUT:], model.conv_head, model.bn2, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()
    return trunk, tail


@torch.no_grad()  # not inference_mode: the features are inputs of the tail's backward pass
def trunk_features(trunk: nn.Module, images: Tensor, *, image_size: int, batch_size: int = 256) -> Tensor:
    """Trunk features ``(N, 192, image_size/32, image_size/32)`` of grey images ``(N, 1, 28, 28)``."""
    from weightlab.models.pretrained import preprocess

    parts = [trunk(preprocess(images[i:i + batch_size], size=image_size, resize_to=image_size))
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def feature_key(task: ImageTask, *, image_size: int, n_pool: int, n_test: int) -> str:
    """The cache key: everything the features depend on (the task's images — source, transform, chunk —,
    sizes, cut, the weights); tasks that differ only in their labels share it."""
    from weightlab.models.pretrained import LITE0_SHA256

    images = {"source": task.source, "transform": task.transform, "chunk": task.chunk}
    spec = {"images": images, "image_size": image_size, "n_pool": n_pool, "n_test": n_test, "cut": CUT,
            "weights": LITE0_SHA256, "version": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(task: ImageTask, trunk: nn.Module, *, image_size: int, n_pool: int,
                    n_test: int) -> dict[str, Tensor]:
    """``{"pool_x", "pool_y", "test_x", "test_y"}``: the task's trunk features and labels. The features of
    the task's images are computed once and kept, with the source labels, as safetensors under
    ``cache_dir()/features`` (atomic writes; a corrupt entry is recomputed)."""
    from weightlab.weights.io import load_tensors, save_tensors

    key = feature_key(task, image_size=image_size, n_pool=n_pool, n_test=n_test)
    path = cache_dir() / "features" / f"lite0-{task.source}-{task.transform}-{task.chunk}-{key}.safetensors"
    out = None
    if path.is_file():
        try:
            out = load_tensors(path)
        except WeightlabError:
            path.unlink(missing_ok=True)
    if out is None:
        plain = ImageTask(task.name, task.source, task.transform, None, task.chunk)  # source labels
        pool, test = task_images(plain, n_pool=n_pool, n_test=n_test)
        out = {"pool_x": trunk_features(trunk, pool.x, image_size=image_size), "pool_y": pool.y,
               "test_x": trunk_features(trunk, test.x, image_size=image_size), "test_y": test.y}
        save_tensors(out, path, metadata={"images": f"{task.source}/{task.transform}/{task.chunk}",
                                          "image_size": str(image_size)})
    return out | {"pool_y": task_labels(task, out["pool_y"]), "test_y": task_labels(task, out["test_y"])}


# ---------------------------------------------------------------------------------------------- the task models


class TaskNet(nn.Module):
    """The tail with a task's frozen head: ``scale · cos(tail(features), class centroids)`` ``(N, C)``.

    The head plays the part of CLIP's zero-shot text heads (a fixed direction per class, never trained). The
    network stays in eval mode even in ``train()`` — the pretrained BatchNorm statistics are frozen, so a task
    vector holds only the trained parameters' changes."""

    def __init__(self, tail: nn.Module, head: Tensor, scale: float) -> None:
        super().__init__()
        self.tail = tail
        self.register_buffer("head", head)  # (C, 1280), rows of unit norm
        self.scale = scale

    def train(self, mode: bool = True) -> TaskNet:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:  # (N, 192, s, s) -> (N, C)
        return self.scale * F.normalize(self.tail(x), dim=1) @ self.head.T


@torch.no_grad()
def centroid_head(tail: nn.Module, x: Tensor, y: Tensor, classes: int, *, batch_size: int = 500) -> Tensor:
    """Unit-norm class means ``(classes, 1280)`` of the pretrained tail's pooled features of ``x``."""
    feats = F.normalize(torch.cat([tail(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]), dim=1)
    means = torch.stack([feats[y == c].mean(0) for c in range(classes)])
    return F.normalize(means, dim=1)


def tail_state(tail: nn.Module) -> dict[str, Tensor]:
    """A copy of the tail's trainable parameters (what is fine-tuned, merged and masked)."""
    return {k: p.detach().clone() for k, p in tail.named_parameters()}


def load_tail(tail: nn.Module, state: dict[str, Tensor]) -> None:
    """Load parameters ``state`` into ``tail`` (its BatchNorm statistics are left as they are)."""
    missing = set(dict(tail.named_parameters())) - set(state)
    if missing:
        raise WeightlabError(f"the tail state lacks {len(missing)} parameter(s) (first: {sorted(missing)[0]!r})")
    tail.load_state_dict(state, strict=False)
