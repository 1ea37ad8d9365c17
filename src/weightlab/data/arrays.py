"""In-memory datasets: the form every weightlab dataset takes once loaded.

An :class:`ArrayDataset` holds images ``x`` (float32 in [0, 1], ``(N, C, H, W)``), integer labels ``y`` and
optional task ids ``t``. It is a :class:`torch.utils.data.Dataset`, so it also works with a DataLoader, but
the training loop batches it by indexing the tensors directly, which is much faster for small data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, default_collate

from weightlab.errors import WeightlabError


@dataclass(frozen=True)
class Batch:
    """One mini-batch: inputs ``x`` ``(B, ...)``, targets ``y`` ``(B,)``, task ids ``t`` ``(B,)`` or None."""

    x: Tensor
    y: Tensor
    t: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        if self.x.device == device:
            return self
        t = None if self.t is None else self.t.to(device, non_blocking=True)
        return Batch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True), t)

    def __len__(self) -> int:
        return self.y.shape[0]


class ArrayDataset(Dataset):
    """Tensors ``x`` ``(N, ...)``, ``y`` ``(N,)`` and optional ``t`` ``(N,)``, indexed together."""

    def __init__(self, x: Tensor, y: Tensor, t: Tensor | None = None) -> None:
        if x.shape[0] != y.shape[0] or (t is not None and t.shape[0] != y.shape[0]):
            raise ValueError(f"x, y and t need the same length, got {x.shape[0]}, {y.shape[0]}, "
                             f"{None if t is None else t.shape[0]}")
        self.x = x
        self.y = y.long()
        self.t = None if t is None else t.long()

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        if self.t is None:
            return self.x[index], self.y[index]
        return self.x[index], self.y[index], self.t[index]

    @property
    def classes(self) -> list[int]:
        """The sorted distinct labels."""
        return torch.unique(self.y).tolist()

    def subset(self, index: Tensor | Sequence[int]) -> ArrayDataset:
        idx = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(self.x[idx], self.y[idx], None if self.t is None else self.t[idx])

    def with_task(self, task_id: int) -> ArrayDataset:
        return ArrayDataset(self.x, self.y, torch.full_like(self.y, task_id))

    def map(self, fn: Callable[[Tensor], Tensor]) -> ArrayDataset:
        """A dataset with ``fn`` applied to all inputs at once."""
        return ArrayDataset(fn(self.x), self.y, self.t)

    def batch(self, index: Tensor | slice) -> Batch:
        return Batch(self.x[index], self.y[index], None if self.t is None else self.t[index])

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[Batch]:
        """Mini-batches by direct tensor indexing (no per-sample Python calls)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            yield self.batch(idx)


def concat(datasets: Sequence[ArrayDataset]) -> ArrayDataset:
    """Concatenate datasets (task ids kept only if every part has them)."""
    has_t = all(d.t is not None for d in datasets)
    return ArrayDataset(
        torch.cat([d.x for d in datasets]),
        torch.cat([d.y for d in datasets]),
        torch.cat([d.t for d in datasets]) if has_t else None,  # type: ignore[misc]
    )


def stratified_split(y: Tensor, fraction: float, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)`` with ``fraction`` of every class held out (at least one if possible)."""
    keep, held = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and n_held == 0 and len(idx) > 1:
            n_held = 1
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


# ---------------------------------------------------------------------------------------------- any dataset
# What train, predict/accuracy, the attacks and RiFT accept: an ArrayDataset (batched by tensor indexing), a
# TensorDataset or Subset of either (viewed as an ArrayDataset, same fast path), any other map-style Dataset
# of (x, y) / (x, y, t) samples (batched by a DataLoader), or a DataLoader (used as it is).

DataLike = Dataset | DataLoader


def array_view(data: object) -> ArrayDataset | None:
    """``data`` as an :class:`ArrayDataset` without a per-sample copy (an ArrayDataset, a TensorDataset of
    ``(x, y[, t])`` with integer labels, or a Subset of either); ``None`` for any other dataset."""
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, TensorDataset) and len(data.tensors) in (2, 3):
        x, y, *t = data.tensors
        if not (y.dtype.is_floating_point or y.dtype.is_complex) and y.dim() == 1:
            return ArrayDataset(x, y, t[0] if t else None)
    if isinstance(data, Subset):
        inner = array_view(data.dataset)
        if inner is not None:
            return inner.subset(list(data.indices))
    return None


def to_batch(item: object) -> Batch:
    """A :class:`Batch` from what a DataLoader yields: a ``Batch``, or a tuple/list ``(x, y)`` / ``(x, y, t)``
    of tensors, or a dict with keys ``x``, ``y`` and optionally ``t``."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict) and {"x", "y"} <= set(item):
        item = (item["x"], item["y"], item["t"]) if "t" in item else (item["x"], item["y"])
    if isinstance(item, tuple | list) and len(item) in (2, 3) and all(isinstance(v, Tensor) for v in item):
        x, y, *t = item
        return Batch(x, y, t[0] if t else None)
    got = type(item).__name__ + (f" of {len(item)}" if isinstance(item, tuple | list | dict) else "")
    raise WeightlabError(f"expected batches of (x, y) or (x, y, t) tensors, got a {got}")


def _check_map_style(data: object) -> None:
    if isinstance(data, IterableDataset):
        raise WeightlabError(f"{type(data).__name__} is an IterableDataset; wrap it in a DataLoader "
                             "(or pass a map-style Dataset)")
    if not isinstance(data, Dataset | DataLoader):
        raise WeightlabError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")


def iter_batches(data: DataLike, batch_size: int, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Batch]:
    """Mini-batches of any dataset. A DataLoader is iterated as it is (its own batch size, sampler and
    workers; ``batch_size``, ``shuffle`` and ``drop_last`` do not apply); everything else is batched here,
    in the same order for the same ``generator`` whatever the dataset type (ArrayDataset, TensorDataset and
    their Subsets by tensor indexing, other datasets sample by sample)."""
    _check_map_style(data)
    if isinstance(data, DataLoader):
        return (to_batch(b) for b in data)
    fast = array_view(data)
    if fast is not None:
        return fast.batches(batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
    return _collated_batches(data, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


def _collated_batches(data: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
                      drop_last: bool) -> Iterator[Batch]:
    """Batches of a map-style dataset in the order :meth:`ArrayDataset.batches` draws (one ``randperm`` from
    ``generator``), collated in this process; pass a DataLoader for worker processes."""
    n = len(data)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield to_batch(default_collate([data[i] for i in order[start:start + batch_size].tolist()]))


def num_batches(data: DataLike, batch_size: int, *, drop_last: bool = False) -> int:
    """Batches :func:`iter_batches` yields per pass."""
    _check_map_style(data)
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as e:
        raise WeightlabError(f"the {type(data).__name__} must have a length (over a map-style dataset)") from e
    if isinstance(data, DataLoader):
        return n
    return n // batch_size if drop_last else -(-n // batch_size)


def as_array_dataset(data: DataLike, *, batch_size: int = 512) -> ArrayDataset:
    """``data`` in memory as an :class:`ArrayDataset` (returned as it is when it already is one; a
    TensorDataset is viewed without a copy). For fixed evaluation sets (adversarial examples, MRC data)."""
    fast = None if isinstance(data, DataLoader) else array_view(data)
    if fast is not None:
        return fast
    parts = list(iter_batches(data, batch_size))
    if not parts:
        raise WeightlabError(f"the {type(data).__name__} holds no samples")
    has_t = all(b.t is not None for b in parts)
    return ArrayDataset(torch.cat([b.x for b in parts]), torch.cat([b.y for b in parts]),
                        torch.cat([b.t for b in parts]) if has_t else None)  # type: ignore[misc]
