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
from torch.utils.data import Dataset


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
