"""Scenarios are plain data: an :class:`Experience` and a stream is a list of them.

Streams are built by functions (DESIGN.md §6):

* :func:`class_incremental` — classes split into tasks in a seeded order, labels kept global (one head that
  grows or covers all classes);
* :func:`task_incremental` — the same splits with task ids and labels local to each task (one head per task);
* :func:`domain_incremental` — the same label set in every task, inputs transformed per task (pixel
  permutations or rotations).

Every experience carries a validation split carved from its training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.data.arrays import ArrayDataset, concat, stratified_split
from weightlab.errors import WeightlabError


@dataclass(frozen=True)
class Experience:
    """One task of a stream: its train/validation/test data, the (global) classes it holds and its id."""

    train: ArrayDataset
    test: ArrayDataset
    val: ArrayDataset
    classes: tuple[int, ...]
    task_id: int


Stream = list[Experience]


def class_order(n_classes: int, seed: int | None) -> list[int]:
    """``0..n-1`` when ``seed`` is None, else a seeded permutation."""
    if seed is None:
        return list(range(n_classes))
    return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def _split_classes(order: Sequence[int], n_tasks: int) -> list[tuple[int, ...]]:
    if not 1 <= n_tasks <= len(order):
        raise WeightlabError(f"n_tasks must be between 1 and the {len(order)} classes, got {n_tasks}")
    if len(order) % n_tasks:
        raise WeightlabError(f"{len(order)} classes do not split evenly into {n_tasks} tasks")
    k = len(order) // n_tasks
    return [tuple(order[i * k:(i + 1) * k]) for i in range(n_tasks)]


def _select(data: ArrayDataset, classes: Sequence[int]) -> ArrayDataset:
    mask = torch.isin(data.y, torch.tensor(list(classes)))
    return data.subset(torch.nonzero(mask).flatten())


def _train_val(data: ArrayDataset, val_fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    keep, held = stratified_split(data.y, val_fraction, generator=torch.Generator().manual_seed(seed))
    return data.subset(keep), data.subset(held)


def class_incremental(train: ArrayDataset, test: ArrayDataset, n_tasks: int, *, seed: int | None = 0,
                      val_fraction: float = 0.1, order: Sequence[int] | None = None) -> Stream:
    """Split the classes into ``n_tasks`` equal groups (order seeded by ``seed``; ``order`` overrides it)."""
    order = list(order) if order is not None else class_order(len(train.classes), seed)
    stream = []
    for task_id, classes in enumerate(_split_classes(order, n_tasks)):
        tr, val = _train_val(_select(train, classes), val_fraction, (seed or 0) + task_id)
        stream.append(Experience(tr, _select(test, classes), val, classes, task_id))
    return stream


def task_incremental(train: ArrayDataset, test: ArrayDataset, n_tasks: int, *, seed: int | None = 0,
                     val_fraction: float = 0.1) -> Stream:
    """Class splits with task ids set and labels mapped to ``0..k-1`` within each task."""
    stream = []
    for exp in class_incremental(train, test, n_tasks, seed=seed, val_fraction=val_fraction):
        lookup = torch.full((max(exp.classes) + 1,), -1, dtype=torch.long)
        lookup[list(exp.classes)] = torch.arange(len(exp.classes))

        def local(d: ArrayDataset, t: int = exp.task_id, lk: Tensor = lookup) -> ArrayDataset:
            return ArrayDataset(d.x, lk[d.y], torch.full_like(d.y, t))

        stream.append(Experience(local(exp.train), local(exp.test), local(exp.val), exp.classes, exp.task_id))
    return stream


def permute_pixels(x: Tensor, perm: Tensor) -> Tensor:
    """Apply one pixel permutation ``perm`` ``(H·W,)`` to every image of ``x`` ``(N, C, H, W)``."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate every image of ``x`` ``(N, C, H, W)`` by ``degrees`` (bilinear, zero padding)."""
    rad = torch.deg2rad(torch.tensor(float(degrees)))
    theta = torch.tensor([[torch.cos(rad), -torch.sin(rad), 0.0], [torch.sin(rad), torch.cos(rad), 0.0]])
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False).clamp_(0, 1)


def domain_incremental(train: ArrayDataset, test: ArrayDataset, n_tasks: int, *, kind: str = "permutation",
                       seed: int = 0, val_fraction: float = 0.1, max_degrees: float = 180.0,
                       first_identity: bool = True, with_task_ids: bool = False) -> Stream:
    """The whole label set in every task; task ``i`` applies its own pixel permutation or rotation.

    Args:
        kind: ``"permutation"`` (seeded pixel permutations) or ``"rotation"`` (angles evenly spaced in
            ``[0, max_degrees)``).
        first_identity: task 0 sees the untransformed data.
        with_task_ids: set task ids (for task-conditioned models such as hypernetworks).
    """
    if kind not in {"permutation", "rotation"}:
        raise WeightlabError(f"kind must be 'permutation' or 'rotation', got {kind!r}")
    if n_tasks < 1:
        raise WeightlabError(f"n_tasks must be ≥ 1, got {n_tasks}")
    gen = torch.Generator().manual_seed(seed)
    classes = tuple(train.classes)
    base_train, base_val = _train_val(train, val_fraction, seed)
    stream = []
    for task_id in range(n_tasks):
        if kind == "permutation":
            hw = train.x.shape[-1] * train.x.shape[-2]
            perm = torch.arange(hw) if (task_id == 0 and first_identity) else torch.randperm(hw, generator=gen)

            def fn(x: Tensor, p: Tensor = perm) -> Tensor:
                return permute_pixels(x, p)
        else:
            angle = max_degrees * task_id / n_tasks

            def fn(x: Tensor, a: float = angle) -> Tensor:
                return rotate(x, a) if a else x

        parts = [d.map(fn) for d in (base_train, test, base_val)]
        if with_task_ids:
            parts = [d.with_task(task_id) for d in parts]
        stream.append(Experience(parts[0], parts[1], parts[2], classes, task_id))
    return stream


def cumulative(stream: Stream, upto: int) -> ArrayDataset:
    """The union of the training data of experiences ``0..upto`` (the joint-training baseline)."""
    return concat([e.train for e in stream[: upto + 1]])
