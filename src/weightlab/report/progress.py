"""Progress bars for long loops.

Library code wraps its long loops in :func:`track`; it draws nothing unless a progress display is active
(the CLI activates one with :func:`display`), so tests and library users get no output by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_ACTIVE: list[Progress] = []


@contextlib.contextmanager
def display(*, enabled: bool = True) -> Iterator[None]:
    """Show progress bars for every :func:`track` inside this block (on stderr, redrawn in place)."""
    if not enabled:
        yield
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    _ACTIVE.append(progress)
    try:
        with progress:
            yield
    finally:
        _ACTIVE.remove(progress)


def track(items: Iterable[T], description: str, *, total: int | None = None, transient: bool = True) -> Iterator[T]:
    """Iterate over ``items``, advancing a bar when a display is active (a plain loop otherwise)."""
    if not _ACTIVE:
        yield from items
        return
    progress = _ACTIVE[-1]
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    task = progress.add_task(description, total=total)
    try:
        for item in items:
            yield item
            progress.advance(task)
    finally:
        if transient:
            progress.remove_task(task)
