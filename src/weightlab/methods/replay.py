"""Experience replay: a fixed-size memory of past samples mixed into every training batch.

The memory is class-balanced: after each experience it holds ``memory // n_seen_classes`` samples of every
class seen so far (chosen at random, seeded). Herding selection (iCaRL) lives with Weight Aligning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from weightlab.data.arrays import ArrayDataset, Batch
from weightlab.errors import WeightlabError
from weightlab.train.callbacks import Callback


class ReplayBuffer:
    """Class-balanced memory of at most ``capacity`` samples (``x``, ``y`` and optional task ids ``t``)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise WeightlabError(f"replay memory must be ≥ 0, got {capacity}")
        self.capacity = capacity
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.t: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.y is None else self.y.shape[0]

    def dataset(self) -> ArrayDataset:
        if self.x is None or self.y is None:
            raise WeightlabError("the replay memory is empty")
        return ArrayDataset(self.x, self.y, self.t)

    def update(self, data: ArrayDataset, *, generator: torch.Generator) -> None:
        """Add ``data`` and shrink every class to an equal share of the capacity (random choice)."""
        pool = data if self.x is None else _cat(self.dataset(), data)
        classes = torch.unique(pool.y).tolist()
        per_class = self.capacity // max(len(classes), 1)
        keep = []
        for c in classes:
            idx = torch.nonzero(pool.y == c).flatten()
            keep.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
        kept = pool.subset(torch.sort(torch.cat(keep)).values) if keep else pool.subset([])
        self.x, self.y, self.t = kept.x, kept.y, kept.t

    def sample(self, n: int, *, generator: torch.Generator) -> Batch:
        idx = torch.randint(len(self), (n,), generator=generator)
        return self.dataset().batch(idx)

    def state(self, prefix: str = "memory") -> dict[str, Tensor]:
        out = {}
        for name in ("x", "y", "t"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}.{name}"] = value
        return out

    def load(self, tensors: dict[str, Tensor], prefix: str = "memory") -> None:
        self.x = tensors.get(f"{prefix}.x")
        self.y = tensors.get(f"{prefix}.y")
        self.t = tensors.get(f"{prefix}.t")


def _cat(a: ArrayDataset, b: ArrayDataset) -> ArrayDataset:
    from weightlab.data.arrays import concat

    return concat([a, b])


class Replay(Callback):
    """Append ``batch_size`` replayed samples to every batch; add the experience to memory at its end.

    Args:
        buffer: the memory (shared across experiences).
        batch_size: replayed samples per batch (default: as many as the incoming batch).
    """

    def __init__(self, buffer: ReplayBuffer, *, batch_size: int | None = None) -> None:
        self.buffer = buffer
        self.batch_size = batch_size

    def on_batch(self, state, batch: Batch) -> Batch:  # noqa: ANN001
        if len(self.buffer) == 0:
            return batch
        mem = self.buffer.sample(self.batch_size or len(batch), generator=state.generator).to(state.device)
        t = None if batch.t is None or mem.t is None else torch.cat([batch.t, mem.t])
        return Batch(torch.cat([batch.x, mem.x]), torch.cat([batch.y, mem.y]), t)

    def on_experience_end(self, state) -> None:  # noqa: ANN001
        if state.experience is None:
            raise WeightlabError("Replay needs train(..., experience=exp) to know what to memorise")
        self.buffer.update(state.experience.train, generator=state.generator)
