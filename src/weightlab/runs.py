"""Run directories: ``runs/<experiment>/<name>/`` with the resolved config, results, plots and checkpoints.

    runs/forgetting/quick-seed0-20261127-101500/
      config.yaml        the resolved configuration (experiment, profile, seed, every config field)
      results.json       claims (verdicts, effects, intervals), tables, notes, provenance, each seed's record
      results.md         the same as Markdown tables
      plots/*.png
      trials/seed<k>.json         each finished seed's record (a resumed run skips these seeds)
      checkpoints/*.safetensors   resumable state inside a seed, written atomically

A :class:`RunContext` is the run directory; each seed's ``trial`` gets a :class:`TrialContext`, a view of it
bound to that seed, which stores JSON records (:meth:`TrialContext.cached`) and ``state_dict()``-able objects
(:meth:`TrialContext.fitted`, :meth:`TrialContext.stream`), and seeds every unit of work from the trial seed
and the unit's key — so a resumed run repeats exactly the computation of an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from torch import Tensor

from weightlab import distributed
from weightlab.errors import FormatError, WeightlabError
from weightlab.report.progress import track
from weightlab.utils import derive_seed, seed_everything
from weightlab.weights.io import load_tensors, read_metadata, save_tensors, write_text_atomic

T = TypeVar("T")
R = TypeVar("R")


class Stateful(Protocol):
    """Anything checkpointed by :class:`TrialContext`: a module, a replay buffer, an EWC penalty, ..."""

    def state_dict(self) -> Mapping[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor], /) -> Any: ...


def roundtrip(value: T) -> T:
    """``value`` after a trip through JSON (tuples become lists, NumPy and torch scalars Python numbers), so a
    fresh run hands ``summarise`` exactly what a resumed run reads back."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a trial record must be JSON-able; got a {type(value).__name__}: {value!r:.80}")


def pack(objects: Mapping[str, Stateful]) -> dict[str, Tensor]:
    """One flat tensor dict ``{"<name>.<key>": tensor}`` of every object's ``state_dict()``."""
    for name in objects:
        if not name or "." in name:
            raise WeightlabError(f"checkpointed object names must be non-empty and dot-free, got {name!r}")
    return {f"{name}.{k}": v for name, obj in objects.items() for k, v in obj.state_dict().items()}


def unpack(objects: Mapping[str, Stateful], tensors: dict[str, Tensor]) -> None:
    """Load the tensors written by :func:`pack` back into each object."""
    for name, obj in objects.items():
        obj.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})


class RunContext:
    """The run directory of one experiment run: resumable state and JSON records, plots."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.checkpoints = self.dir / "checkpoints"
        self.plots = self.dir / "plots"
        self.saves = 0  # how many states were saved in this process (used by interruption tests)
        self.logger: Any = None  # a TensorBoardLogger when the run was started with --log tensorboard

    def trial(self, seed: int) -> TrialContext:
        return TrialContext(self, seed)

    # ------------------------------------------------------------------ tensors (+ JSON meta)
    def _path(self, key: str, suffix: str = ".safetensors") -> Path:
        # percent-encoding is one-to-one: distinct keys never share a file ("a/b+" vs "a/b")
        return self.checkpoints / f"{quote(key, safe='')}{suffix}"

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

    # ------------------------------------------------------------------ JSON records
    def record_path(self, key: str) -> Path:
        return self._path(key, ".json")

    def save_record(self, key: str, value: Any, *, path: Path | None = None) -> None:
        if distributed.is_main():
            write_text_atomic(path or self.record_path(key), json.dumps(value, default=_json_default))
        distributed.barrier()

    def load_record(self, key: str, *, path: Path | None = None) -> Any:
        return json.loads((path or self.record_path(key)).read_text())

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


class TrialContext:
    """One seed's view of the run directory: keys are stored under ``seed<k>/``, and every unit of work is
    seeded from the trial seed and its key (:meth:`seeded`)."""

    def __init__(self, run: RunContext, seed: int) -> None:
        self.run = run
        self.seed = seed

    def for_seed(self, seed: int) -> TrialContext:
        """The same run directory seen from another seed (e.g. a choice made once on the first seed)."""
        return TrialContext(self.run, seed)

    def key(self, key: str) -> str:
        return f"seed{self.seed}/{key}"

    def seeded(self, *keys: object) -> int:
        """Seed Python, NumPy and torch from ``derive_seed(seed, *keys)``; returns that seed (for a
        ``TrainConfig``). Call it before anything random that is not inside :meth:`cached`, :meth:`fitted` or
        a :meth:`stream` step, so that it does not depend on what ran (or was resumed) before."""
        unit_seed = derive_seed(self.seed, *keys)
        seed_everything(unit_seed)
        return unit_seed

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """The JSON value stored under ``key``, or ``compute()`` (seeded from ``key``), stored and returned."""
        full = self.key(key)
        if self.run.record_path(full).is_file():
            return self.run.load_record(full)
        self.seeded(key)
        value = roundtrip(compute())
        self.run.save_record(full, value)
        return value

    def fitted(self, key: str, objects: Mapping[str, Stateful], fit: Callable[[], T]) -> T:
        """Restore ``objects`` saved under ``key``; or seed from ``key``, run ``fit()`` (which trains them) and
        save their ``state_dict()`` with fit's JSON result. Returns that result."""
        full = self.key(key)
        if self.run.has_state(full):
            meta = self.run.restore(full, lambda tensors: unpack(objects, tensors))
            if "value" not in meta:
                raise FormatError(f"checkpoint {str(self.run._path(full))!r} holds no fitted result; delete it to "
                                  "recompute")
            return meta["value"]
        self.seeded(key)
        value = roundtrip(fit())
        self.run.save_state(full, pack(objects), {"value": value})
        return value

    def stream(self, key: str, n: int, step: Callable[[int, int], R], objects: Mapping[str, Stateful], *,
               every: int = 1) -> list[R]:
        """Run ``step(i, seed)`` for experiences ``i = 0..n-1``, seeded from ``(key, i)``, with a checkpoint of
        ``objects`` (what must survive an interruption: model, memory, ...) after each one.

        ``step`` returns that experience's JSON record (e.g. a row of the accuracy matrix); ``seed`` is the
        experience's seed for its ``TrainConfig``. After an interruption the last checkpoint is loaded and the
        stream continues after it, so the end result equals an uninterrupted run. ``every = k`` checkpoints
        only after every k-th experience (and the last): for streams of hundreds of short experiences, where
        a checkpoint costs as much as an experience; a resumed run then repeats at most ``k − 1`` of them.
        """
        if every < 1:
            raise WeightlabError(f"checkpoint interval must be ≥ 1 experience, got {every}")
        full = self.key(key)
        done = [i for i in range(n) if self.run.has_state(f"{full}/exp{i}")]
        rows: list[R] = []
        start, last = 0, None
        if done:
            meta = self.run.restore(f"{full}/exp{done[-1]}", lambda tensors: unpack(objects, tensors))
            if not isinstance(meta.get("rows"), list) or len(meta["rows"]) != done[-1] + 1:
                raise FormatError(f"checkpoint {str(self.run._path(f'{full}/exp{done[-1]}'))!r} does not hold the "
                                  f"{done[-1] + 1} records of experiences 0..{done[-1]}")
            rows, start, last = meta["rows"], done[-1] + 1, done[-1]
        logger = self.run.logger
        for i in track(range(start, n), key, total=n - start):
            rows.append(roundtrip(step(i, self.seeded(key, i))))
            if (i + 1) % every == 0 or i == n - 1:
                self.run.save_state(f"{full}/exp{i}", pack(objects), {"rows": rows})
                if last is not None:
                    self.run.drop_state(f"{full}/exp{last}")
                last = i
            if logger is not None and _accuracies(rows[-1]) is not None:
                logger.experience(full, i, _accuracies(rows[-1]))
        if logger is not None and start < n and all(_accuracies(r) is not None for r in rows):
            logger.matrix(full, [_accuracies(r) for r in rows])
        return rows

    def track(self, items: Iterable[T], description: str, *, total: int | None = None) -> Iterator[T]:
        return track(items, description, total=total)


def _accuracies(row: Any) -> list[float] | None:
    """The accuracy row in a stream record: the record itself, or its ``"accuracies"`` entry."""
    if isinstance(row, dict):
        row = row.get("accuracies")
    if isinstance(row, list) and all(isinstance(v, (int, float)) for v in row):
        return row
    return None
