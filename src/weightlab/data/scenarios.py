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


def per_class_subset(data: ArrayDataset, per_class: int, *, seed: int = 0) -> ArrayDataset:
    """A seeded subset with at most ``per_class`` samples of every class (all of a smaller class), in the
    original order; ``per_class = 0`` keeps everything.

    Raises:
        WeightlabError: ``per_class`` is negative.
    """
    if per_class < 0:
        raise WeightlabError(f"per_class must be ≥ 0 (0: all), got {per_class}")
    if per_class == 0:
        return data
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == c).flatten()
        parts.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return data.subset(torch.sort(torch.cat(parts)).values)


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


# ---------------------------------------------------------------------------------------------- SCoLe
# Paper key ``scole`` (Lesort et al., CoLLAs 2023; official code ``sampling.py``): ``T`` tasks of ``C`` classes
# drawn without replacement from ``N`` with a (possibly imbalanced) distribution; re-occurrence is implicit;
# the ``forgetting`` variant samples only the first half of the classes after ``T/2``.


@dataclass(frozen=True)
class SCoLeConfig:
    """The SCoLe generator (paper key ``scole``; defaults: 10 classes, 2 per task, 500 tasks as in the paper).

    Args:
        entropy_decrease: ``k`` of the imbalanced distribution (0: uniform).
        prob_reduction: after a class is drawn its probability is divided by this (0: off).
        forgetting: after ``T/2`` only the first ``N // 2`` classes are sampled (uniformly).
    """

    num_classes: int = 10
    classes_per_task: int = 2
    n_tasks: int = 500
    entropy_decrease: float = 0.0
    prob_reduction: float = 0.0
    forgetting: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise WeightlabError(f"SCoLe needs num_classes ≥ 2, got {self.num_classes}")
        if not 1 <= self.classes_per_task <= self.num_classes:
            raise WeightlabError(
                f"classes_per_task must be in 1..{self.num_classes}, got {self.classes_per_task}"
            )
        if self.forgetting and self.classes_per_task > self.num_classes // 2:
            raise WeightlabError(
                f"the forgetting variant samples {self.classes_per_task} classes from the first "
                f"{self.num_classes // 2}: use classes_per_task ≤ {self.num_classes // 2}"
            )
        if self.n_tasks < 1:
            raise WeightlabError(f"n_tasks must be ≥ 1, got {self.n_tasks}")
        if self.entropy_decrease < 0 or self.prob_reduction < 0:
            raise WeightlabError(
                f"entropy_decrease and prob_reduction must be ≥ 0, got {self.entropy_decrease} "
                f"and {self.prob_reduction}"
            )


def class_probabilities(
    num_classes: int, *, entropy_decrease: float = 0.0, seed: int = 0, factor: float | None = None
) -> Tensor:
    """The class distribution ``(N,)``: uniform for ``k = 0``; else ``p_i = 1/N − (i/N)·f`` normalised, raised
    to
    the power ``k``, normalised again and shuffled with ``seed`` (``f`` = 0.05, or 0.01 when N = 100)."""
    p = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    if entropy_decrease == 0:
        return p
    f = factor if factor is not None else (0.01 if num_classes == 100 else 0.05)
    p = p - torch.arange(num_classes, dtype=torch.float64) / num_classes * f
    if (p <= 0).any():
        raise WeightlabError(f"factor {f} makes some class probabilities ≤ 0 for {num_classes} classes")
    p = p / p.sum()
    p = p**entropy_decrease / (p**entropy_decrease).sum()
    return p[torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))]


def scole_tasks(config: SCoLeConfig) -> list[tuple[int, ...]]:
    """The classes of every task (sorted within a task), seeded by ``config.seed``."""
    gen = torch.Generator().manual_seed(config.seed)
    p = class_probabilities(config.num_classes, entropy_decrease=config.entropy_decrease, seed=config.seed)
    tasks = []
    for task_id in range(config.n_tasks):
        if config.forgetting and task_id > config.n_tasks / 2:
            drawn = torch.randperm(config.num_classes // 2, generator=gen)[: config.classes_per_task]
        else:
            drawn = torch.multinomial(p, config.classes_per_task, replacement=False, generator=gen)
            if config.prob_reduction:
                p[drawn] /= config.prob_reduction
                p = p / p.sum()
        tasks.append(tuple(sorted(drawn.tolist())))
    return tasks


def class_frequencies(tasks: Sequence[tuple[int, ...]], num_classes: int) -> Tensor:
    """Fraction of tasks in which each class occurs ``(num_classes,)``."""
    counts = torch.zeros(num_classes)
    for classes in tasks:
        counts[list(classes)] += 1
    return counts / max(len(tasks), 1)


class SCoLeStream(Sequence[Experience]):
    """The SCoLe schedule as a lazy sequence of experiences over ``train``/``test``.

    Each class's training indices are split once (seeded) into train and validation parts
    (``val_fraction``, as the official code's 10% split); ``stream[i]`` gathers the task's classes.
    ``full_test`` is the test set of all classes (what knowledge accumulation is measured on).
    """

    def __init__(
        self, train: ArrayDataset, test: ArrayDataset, config: SCoLeConfig, *, val_fraction: float = 0.1
    ) -> None:
        missing = sorted(set(range(config.num_classes)) - set(train.classes))
        if missing:
            raise WeightlabError(
                f"SCoLe with {config.num_classes} classes needs labels 0..{config.num_classes - 1}"
                f" in the training data; missing {missing}"
            )
        self.config = config
        self.tasks = scole_tasks(config)
        keep_cls = torch.arange(config.num_classes)
        self.train_data = train.subset(torch.nonzero(torch.isin(train.y, keep_cls)).flatten())
        self.full_test = test.subset(torch.nonzero(torch.isin(test.y, keep_cls)).flatten())
        keep, held = stratified_split(
            self.train_data.y, val_fraction, generator=torch.Generator().manual_seed(config.seed)
        )
        y = self.train_data.y
        self._train_idx = [keep[y[keep] == c] for c in range(config.num_classes)]
        self._val_idx = [held[y[held] == c] for c in range(config.num_classes)]
        ty = self.full_test.y
        self._test_idx = [torch.nonzero(ty == c).flatten() for c in range(config.num_classes)]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Experience:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"task {i} out of range for a stream of {len(self)} tasks")
        i = i % len(self)
        classes = self.tasks[i]

        def gather(data: ArrayDataset, parts: list[Tensor]) -> ArrayDataset:
            return data.subset(torch.cat([parts[c] for c in classes]))

        return Experience(
            gather(self.train_data, self._train_idx),
            gather(self.full_test, self._test_idx),
            gather(self.train_data, self._val_idx),
            classes,
            i,
        )
