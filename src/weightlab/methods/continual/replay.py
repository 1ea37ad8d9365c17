"""Experience replay: a fixed-size memory of past samples mixed into every training batch.

The memory is class-balanced: after each experience it holds ``memory // n_seen_classes`` samples of every
class seen so far (chosen at random, seeded). With a ``selector`` (e.g. iCaRL herding, in
:mod:`weightlab.methods.continual.exemplars`) or a fixed ``per_class`` budget the memory is *ordered*: each class keeps
its samples in priority order, a new class is filled by the selector, and shrinking keeps the first ``m`` of
each class (iCaRL's reduction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from weightlab.data.arrays import ArrayDataset, Batch, concat
from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState

Selector = Callable[[ArrayDataset, int], Tensor]
"""``selector(data_of_one_class, m) -> (≤ m,)`` indices into the data, best first."""


class ReplayBuffer:
    """Class-balanced memory of at most ``capacity`` samples (``x``, ``y`` and optional task ids ``t``).

    Args:
        capacity: total memory, shared equally by the classes seen so far.
        per_class: keep exactly this many samples of every class instead (the total then grows with the
            classes and ``capacity`` is not used).
        selector: how the samples of a new class are chosen, best first (default: at random).
    """

    def __init__(self, capacity: int, *, per_class: int | None = None,
                 selector: Selector | None = None) -> None:
        if capacity < 0:
            raise WeightlabError(f"replay memory must be ≥ 0, got {capacity}")
        if per_class is not None and per_class < 1:
            raise WeightlabError(f"per_class memory must be ≥ 1, got {per_class}")
        self.capacity = capacity
        self.per_class = per_class
        self.selector = selector
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.t: Tensor | None = None
        self.seen = torch.zeros(0, dtype=torch.long)  # every class ever added, even if its share is now 0

    def _see(self, data: ArrayDataset) -> list[int]:
        self.seen = torch.unique(torch.cat([self.seen, data.y]))
        return self.seen.tolist()

    def __len__(self) -> int:
        return 0 if self.y is None else self.y.shape[0]

    def dataset(self) -> ArrayDataset:
        if self.x is None or self.y is None:
            raise WeightlabError("the replay memory is empty")
        return ArrayDataset(self.x, self.y, self.t)

    def update(self, data: ArrayDataset, *, generator: torch.Generator) -> None:
        """Add ``data`` and shrink every class to an equal share of the capacity (random choice)."""
        if self.selector is not None or self.per_class is not None:
            self._update_ordered(data, generator=generator)
            return
        pool = data if self.x is None else concat([self.dataset(), data])
        classes = self._see(data)
        per_class = self.capacity // max(len(classes), 1)
        keep = []
        for c in classes:
            idx = torch.nonzero(pool.y == c).flatten()
            keep.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
        kept = pool.subset(torch.sort(torch.cat(keep)).values) if keep else pool.subset([])
        self.x, self.y, self.t = kept.x, kept.y, kept.t

    def share(self, n_classes: int) -> int:
        """Samples kept per class when ``n_classes`` classes are in memory."""
        return self.per_class if self.per_class is not None else self.capacity // max(n_classes, 1)

    def _update_ordered(self, data: ArrayDataset, *, generator: torch.Generator) -> None:
        # Each class: its stored samples (already in priority order), then the selector's picks from ``data``;
        # keep the first ``m``. Stored classes therefore shrink by truncation, as in iCaRL.
        old = self.dataset() if self.x is not None else None
        classes = self._see(data)
        m = self.share(len(classes))
        parts = []
        for c in classes:
            if old is not None:
                parts.append(old.subset(torch.nonzero(old.y == c).flatten()[:m]))
            room = m - (len(parts[-1]) if old is not None else 0)
            new_idx = torch.nonzero(data.y == c).flatten()
            if room > 0 and len(new_idx):
                own = data.subset(new_idx)
                order = (self.selector(own, room) if self.selector is not None
                         else torch.randperm(len(own), generator=generator))
                parts.append(own.subset(order[:room]))
        parts = [p for p in parts if len(p)]
        kept = concat(parts) if parts else data.subset([])
        self.x, self.y, self.t = kept.x, kept.y, kept.t

    def sample(self, n: int, *, generator: torch.Generator) -> Batch:
        idx = torch.randint(len(self), (n,), generator=generator)
        return self.dataset().batch(idx)

    def state_dict(self, prefix: str = "memory") -> dict[str, Tensor]:
        out = {f"{prefix}.seen": self.seen}
        for name in ("x", "y", "t"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}.{name}"] = value
        return out

    def load_state_dict(self, tensors: dict[str, Tensor], prefix: str = "memory") -> None:
        self.x = tensors.get(f"{prefix}.x")
        self.y = tensors.get(f"{prefix}.y")
        self.t = tensors.get(f"{prefix}.t")
        self.seen = tensors.get(f"{prefix}.seen", torch.unique(self.y) if self.y is not None else self.seen)


@dataclass(frozen=True)
class ReplayConfig:
    """``batch_size``: replayed samples appended to each batch (None: as many as the incoming batch)."""

    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise WeightlabError(f"replay batch_size must be ≥ 1 or None, got {self.batch_size}")


@register("method", "replay")
class Replay(Callback):
    """Append replayed samples to every batch; add the experience to memory at its end.

    Args:
        buffer: the memory (shared across experiences).
        config: how many samples to replay per batch.
    """

    def __init__(self, buffer: ReplayBuffer, config: ReplayConfig = ReplayConfig()) -> None:
        self.buffer = buffer
        self.config = config

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        if len(self.buffer) == 0:
            return batch
        mem = self.buffer.sample(self.config.batch_size or len(batch), generator=state.generator).to(state.device)
        t = None if batch.t is None or mem.t is None else torch.cat([batch.t, mem.t])
        return Batch(torch.cat([batch.x, mem.x]), torch.cat([batch.y, mem.y]), t)

    def on_experience_end(self, state: LoopState) -> None:
        if state.experience is None:
            raise WeightlabError("Replay needs train(..., experience=exp) to know what to memorise")
        self.buffer.update(state.experience.train, generator=state.generator)
