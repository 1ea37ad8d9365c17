"""Run directories: ``runs/<experiment>/<name>/`` with the resolved config, results, plots and checkpoints.

    runs/forgetting/quick-seed0-20261127-101500/
      config.yaml        the resolved configuration (experiment, profile, seed, every config field)
      results.json       tables, claims and raw data
      results.md         the same as Markdown tables
      plots/*.png
      checkpoints/*.safetensors   resumable state, written atomically

A :class:`RunContext` is what an experiment receives: where to write, progress bars, and resumable state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from torch import Tensor

from weightlab import distributed
from weightlab.errors import FormatError, WeightlabError
from weightlab.report.progress import track
from weightlab.weights.io import load_tensors, read_metadata, save_tensors

T = TypeVar("T")


class RunContext:
    """The run directory of one experiment run, and its resumable state."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.checkpoints = directory / "checkpoints"
        self.plots = directory / "plots"
        self.saves = 0  # how many states were saved in this process (used by interruption tests)
        self.logger: Any = None  # a TensorBoardLogger when the run was started with --log tensorboard

    # ------------------------------------------------------------------ resumable state
    def _path(self, key: str) -> Path:
        # percent-encoding is one-to-one: distinct keys never share a file ("a/b+" vs "a/b")
        return self.checkpoints / f"{quote(key, safe='')}.safetensors"

    def save_state(self, key: str, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Write ``tensors`` and JSON-able ``meta`` under ``key`` (atomically; rank 0 only under torchrun)."""
        if distributed.is_main():
            save_tensors(tensors, self._path(key), metadata={"weightlab": json.dumps(meta or {})})
        distributed.barrier()
        self.saves += 1

    def has_state(self, key: str) -> bool:
        return self._path(key).is_file()

    def load_state(self, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        path = self._path(key)
        tensors, meta = load_tensors(path), read_metadata(path).get("weightlab")
        try:
            meta = json.loads(meta) if meta is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise FormatError(f"checkpoint {str(path)!r} has no weightlab metadata (a JSON object); it was not "
                              "written by this run")
        return tensors, meta

    def restore(self, key: str, load: Callable[[dict[str, Tensor]], None]) -> dict[str, Any]:
        """Load the state under ``key`` with ``load(tensors)``; returns its metadata.

        A checkpoint whose tensors ``load`` refuses (wrong keys or shapes: another run's, an older version's)
        is a :class:`FormatError` naming the file, not a traceback.
        """
        tensors, meta = self.load_state(key)
        try:
            load(tensors)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise FormatError(f"checkpoint {str(self._path(key))!r} does not fit this run ({why}); delete it to "
                              "recompute from the previous one, or start a new run") from None
        return meta

    def drop_state(self, key: str) -> None:
        distributed.barrier()  # every rank has read what it needs before rank 0 deletes
        if distributed.is_main():
            self._path(key).unlink(missing_ok=True)

    def cached(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Return the JSON result stored under ``key``, computing and storing it if absent (resumable units)."""
        if self.has_state(key):
            return self.load_state(key)[1]
        value = compute()
        self.save_state(key, {}, value)
        return value

    def stream(self, key: str, n: int, step: Callable[[int], list[float]],
               state: Callable[[], dict[str, Tensor]], load: Callable[[dict[str, Tensor]], None], *,
               every: int = 1) -> list[list[float]]:
        """Run ``step(i)`` for experiences ``i = 0..n-1`` with a checkpoint after each one.

        ``step(i)`` trains on experience ``i`` and returns that row of the accuracy matrix; ``state()`` gives
        the tensors that must survive an interruption (model, memory, ...) and ``load`` restores them.
        After an interruption the last finished experience is loaded and the stream continues after it;
        because each experience seeds itself (``derive_seed``), the end result equals an uninterrupted run.
        ``every = k`` checkpoints only after every k-th experience (and the last): for streams of hundreds of
        short experiences, where a checkpoint costs as much as an experience; a resumed run then repeats at
        most ``k − 1`` experiences.
        """
        if every < 1:
            raise WeightlabError(f"checkpoint interval must be ≥ 1 experience, got {every}")
        done = [i for i in range(n) if self.has_state(f"{key}/exp{i}")]
        rows: list[list[float]] = []
        start, last = 0, None
        if done:
            meta = self.restore(f"{key}/exp{done[-1]}", load)
            if not isinstance(meta.get("rows"), list) or len(meta["rows"]) != done[-1] + 1:
                raise FormatError(f"checkpoint {str(self._path(f'{key}/exp{done[-1]}'))!r} does not hold the "
                                  f"{done[-1] + 1} accuracy rows of experiences 0..{done[-1]}")
            rows, start, last = meta["rows"], done[-1] + 1, done[-1]
        for i in track(range(start, n), f"{key}", total=n - start):
            rows.append(step(i))
            if (i + 1) % every == 0 or i == n - 1:
                self.save_state(f"{key}/exp{i}", state(), {"rows": rows})
                if last is not None:
                    self.drop_state(f"{key}/exp{last}")
                last = i
            if self.logger is not None:
                self.logger.experience(key, i, rows[-1])
        if self.logger is not None and start < n:
            self.logger.matrix(key, rows)
        return rows

    # ------------------------------------------------------------------ outputs
    def track(self, items: Iterable[T], description: str, *, total: int | None = None) -> Iterator[T]:
        return track(items, description, total=total)

    def savefig(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``plots/<name>.png`` (rank 0 only) and close it."""
        import matplotlib.pyplot as plt

        path = self.plots / f"{name}.png"
        if distributed.is_main():
            self.plots.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path
