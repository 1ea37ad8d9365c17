"""The task vectors of one key after another, read from checkpoints on disk while the previous key is being
computed (paper key ``tall-masks``; the reading half of the streamed merge).

Every key's ``T + 1`` rows (the base, then each fine-tune) are read straight into one float32 arena that is
reused for the whole merge, so no tensor is allocated (and page-faulted) per key and no row is copied
after it is read. Keys alternate between the bottom and the top of the arena; while the consumer computes
key ``i``, a background thread reads key ``i + 1`` into the other end. The arena holds the largest key,
plus up to :data:`READ_AHEAD_SLACK` of it so that a large key and its neighbour fit side by side; a pair
that does not fit is read when it is needed (so peak memory stays within ``(1 + READ_AHEAD_SLACK) ×``
that of one largest key).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from weightlab.methods.merging.checkpoints import Checkpoint
from weightlab.methods.merging.task_arithmetic import check_finite
from weightlab.methods.merging.workers import PoolOwner
from weightlab.weights.stream_io import DTYPES

READ_AHEAD_SLACK = 0.25  # the arena may exceed the largest key by this fraction to read ahead beside it


class KeyVectors(NamedTuple):
    """One key's tensors, valid until the next key is requested from the stream."""

    key: str
    theta0: Tensor  # the base tensor, in its dtype and shape
    base32: Tensor  # (n,) the base as float32
    vectors: Tensor  # (T, n) float32 task vectors θ_t − θ_0, checked finite


def read_row(ckpt: Checkpoint, key: str, row: Tensor) -> Tensor:
    """Read ``key`` of ``ckpt`` into the float32 row ``(n,)`` (directly when the file holds float32);
    returns the tensor in its own dtype and shape (a view of ``row`` for float32)."""
    reader = ckpt.readers[ckpt.key_file[key]]
    if DTYPES[reader.tensors[key].dtype] == torch.float32:
        return reader.read_into(key, row)
    tensor = reader.read(key)
    row.copy_(tensor.reshape(-1))
    return tensor


class VectorStream(PoolOwner):
    """Iterate over the :class:`KeyVectors` of ``keys`` (floating-point keys of ``base``), reading ahead.

    Each iteration reads the checkpoints again from the first key (a global TIES merge makes several
    passes); call :meth:`close` (or use ``with``) before closing the checkpoints.
    """

    def __init__(
        self, base: Checkpoint, finetuned: Sequence[Checkpoint], keys: Sequence[str], *, read_ahead: bool = True
    ) -> None:
        self.base, self.finetuned, self.keys = base, list(finetuned), list(keys)
        self.rows = len(self.finetuned) + 1
        self.sizes = [base.numel(k) for k in self.keys]
        largest = max(self.sizes, default=0)
        pair = max((a + b for a, b in zip(self.sizes, self.sizes[1:])), default=largest)
        self.capacity = self.rows * max(largest, min(pair, int(largest * (1 + READ_AHEAD_SLACK))))
        self._arena: Tensor | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weightlab-read") if read_ahead else None

    def _region(self, arena: Tensor, i: int) -> Tensor:
        size = self.rows * self.sizes[i]
        start = 0 if i % 2 == 0 else self.capacity - size
        return arena[start : start + size].view(self.rows, self.sizes[i])  # (T + 1, n)

    def _fits_beside(self, i: int) -> bool:
        return self.rows * (self.sizes[i] + self.sizes[i + 1]) <= self.capacity

    def _load(self, arena: Tensor, i: int) -> tuple[Tensor, Tensor]:
        region = self._region(arena, i)
        theta0 = read_row(self.base, self.keys[i], region[0])
        for t, ft in enumerate(self.finetuned):
            read_row(ft, self.keys[i], region[t + 1])
        return theta0, region

    def __iter__(self) -> Iterator[KeyVectors]:
        if self._arena is None:
            self._arena = torch.empty(self.capacity, dtype=torch.float32)
        arena = self._arena
        pending: Future[tuple[Tensor, Tensor]] | None = None
        try:
            for i, key in enumerate(self.keys):
                theta0, region = pending.result() if pending is not None else self._load(arena, i)
                pending = None
                if self._pool is not None and i + 1 < len(self.keys) and self._fits_beside(i):
                    pending = self._pool.submit(self._load, arena, i + 1)
                yield KeyVectors(key, theta0, region[0], self._subtract(key, region))
        finally:
            if pending is not None and not pending.cancel():
                pending.exception()  # wait for it: its rows must not be written after the consumer moves on

    def __len__(self) -> int:
        return len(self.keys)

    def _subtract(self, key: str, region: Tensor) -> Tensor:
        vectors = region[1:]  # (T, n)
        vectors.sub_(region[0])
        if not bool(torch.isfinite(vectors.sum(dim=1)).all()):  # a NaN/Inf entry makes its row's sum non-finite
            for t, ft in enumerate(self.finetuned):
                check_finite(vectors[t], key, f"checkpoint {str(ft.path)!r}")
        return vectors
