"""Column-parallel execution for the streamed merge (paper key ``tall-masks``).

A merge runs thousands of small torch operations on cache-sized chunks. Left to torch's intra-op threads,
each operation is an OpenMP region whose threads spin at a barrier, so on a busy machine every region waits
for a descheduled partner (a merge measured 24× slower beside one other busy process). Instead,
:class:`ColumnWorkers` splits a key's columns into one block per thread and runs each block in its own
Python thread whose torch operations are single-threaded: the threads only meet once per phase of a key,
block without spinning, and keep every core busy, including on the serial ``bincount`` of the thresholds.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

R = TypeVar("R")
P = TypeVar("P", bound="PoolOwner")
MIN_BLOCK = 1 << 15  # columns: smaller keys are not split


def _single_threaded(ready: threading.Barrier) -> None:
    torch.get_num_threads()  # torch sets each thread's OpenMP count from its default on first use: do it now,
    torch.set_num_threads(1)  # then make this thread's count 1 (and the default too, until the caller restores it)
    ready.wait()


class PoolOwner:
    """Owns a thread pool ``_pool`` (or None); ``close()`` (or leaving a ``with`` block) waits for its tasks."""

    _pool: ThreadPoolExecutor | None = None

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the tasks in flight, drop the queued ones and stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class ColumnWorkers(PoolOwner):
    """``threads`` worker threads (default: torch's intra-op thread count) mapping a function over blocks.

    With one thread everything runs inline in the caller, with torch's own threading.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self._pool: ThreadPoolExecutor | None = None
        if self.threads > 1:
            previous = torch.get_num_threads()
            ready = threading.Barrier(self.threads + 1)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="weightlab-merge",
                                            initializer=_single_threaded, initargs=(ready,))
            started = [self._pool.submit(int) for _ in range(self.threads)]  # starts every thread
            ready.wait()
            for f in started:
                f.result()
            torch.set_num_threads(previous)  # the caller's threads keep their setting

    @contextlib.contextmanager
    def serial_caller(self) -> Iterator[None]:
        """With several workers, run the calling thread's own torch operations single-threaded too (restored
        after): a small key is not split, and an OpenMP region per operation would wait for a descheduled
        partner thread on a busy machine just as the workers' would."""
        previous = torch.get_num_threads()
        if self._pool is not None:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def blocks(self, n: int) -> list[slice]:
        """``[0, n)`` in at most ``threads`` contiguous blocks of at least :data:`MIN_BLOCK` columns."""
        count = max(1, min(self.threads, n // MIN_BLOCK))
        bounds = [n * i // count for i in range(count + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def map(self, fn: Callable[[slice], R], n: int) -> list[R]:
        """``[fn(block) for block in blocks(n)]``, the blocks run in parallel; the first error is raised."""
        blocks = self.blocks(n)
        if self._pool is None or len(blocks) == 1:
            return [fn(b) for b in blocks]
        futures = [self._pool.submit(fn, b) for b in blocks]
        wait(futures)  # all blocks are done (none still writes) before an error propagates
        return [f.result() for f in futures]


SERIAL = ColumnWorkers(1)
