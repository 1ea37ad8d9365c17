"""SCoLe (Scaling Continual Learning): long streams of short tasks with re-occurring classes, and its
strategies.

Paper key: ``scole`` — Lesort et al., "Challenging Common Assumptions about Catastrophic Forgetting (and
Knowledge Accumulation)", CoLLAs 2023 (spec/continual.md §2; official code TLESORT/SCoLe-SCaling-Continual-
Learning, ``sampling.py``, ``utils_training.py``, ``replay.py``).

* :func:`class_probabilities` and :func:`scole_tasks` generate the stream: ``T`` tasks of ``C`` classes drawn
  without replacement from ``N`` with a (possibly imbalanced) distribution; re-occurrence is implicit;
  the ``forgetting`` variant samples only the first half of the classes after ``T/2``.
* :class:`SCoLeStream` turns the schedule into :class:`~weightlab.data.scenarios.Experience` objects on
  demand (per-class indices are computed once, so a task costs one gather).
* :class:`GroupMasking` masks the logits of classes absent from the mini-batch (training loss only);
  :class:`TaskOptimizer` resets the optimizer per task or keeps it; :class:`FrequencyReplay` replays the
  rarely seen classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, Batch, concat, stratified_split
from weightlab.data.scenarios import Experience
from weightlab.errors import WeightlabError
from weightlab.train.callbacks import Callback
from weightlab.train.loop import TrainConfig, make_optimizer


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


# ---------------------------------------------------------------------------------------------- strategies


class GroupMasking(Callback):
    """Mask the logits of classes absent from the mini-batch before the training loss (per mini-batch).

    ``logits[:, c] = −1e9`` for every class ``c`` not among ``batch.y``; predictions are unaffected because
    the loop applies ``transform_logits`` to the training loss only. No host sync: the mask is built on
    device.
    """

    def transform_logits(self, state, batch: Batch, logits: Tensor) -> Tensor:  # noqa: ANN001
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[batch.y] = True  # (classes,)
        fill = -1e9 if logits.dtype in (torch.float32, torch.float64) else torch.finfo(logits.dtype).min
        return logits.masked_fill(~present, fill)


class TaskOptimizer:
    """One optimizer per task (``reset=True``: fresh state each task, as ``--reinit_opt Yes``) or one for the
    whole stream; :meth:`state`/:meth:`load` make the persistent one resumable."""

    def __init__(self, model: nn.Module, config: TrainConfig, *, reset: bool) -> None:
        self.model, self.config, self.reset = model, config, reset
        self._optimizer: torch.optim.Optimizer | None = None

    def get(self) -> torch.optim.Optimizer:
        if self.reset or self._optimizer is None:
            self._optimizer = make_optimizer(self.model.parameters(), self.config)
        return self._optimizer

    def state(self, prefix: str = "optim") -> dict[str, Tensor]:
        if self.reset or self._optimizer is None:
            return {}
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        out = {}
        for i, p in enumerate(params):
            for name, value in self._optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    out[f"{prefix}.{i}.{name}"] = value
        return out

    def load(self, tensors: dict[str, Tensor], prefix: str = "optim") -> None:
        if self.reset:
            return
        optimizer = self.get()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for key, value in tensors.items():
            if key.startswith(prefix + "."):
                _, index, name = key.split(".", 2)
                param = params[int(index)]  # moments go to the parameter's device; Adam keeps "step" on the CPU
                optimizer.state[param][name] = value.clone() if name == "step" else value.to(param.device, copy=True)


class FrequencyReplay:
    """The official ``FrequencyReplay``: a per-class memory, and replay of the rarely seen classes.

    Memory: up to ``per_class`` samples of each class; when a class re-occurs, ``max(per_class/(occ+1),
    per_class/20)`` of its stored samples are renewed from the new data. Replay: up to ``C`` (the task's class
    count) least-frequent classes, not in the task, seen ≥ ``trigger`` times, with frequency (occurrences /
    tasks
    so far) in ``(low, high]``; ``replay_per_class`` of their stored samples join the task's training data.
    The memory is one preallocated ``(classes, per_class, ...)`` tensor, so nothing grows along the stream.
    """

    def __init__(
        self,
        num_classes: int,
        sample_shape: Sequence[int],
        *,
        per_class: int = 200,
        replay_per_class: int = 100,
        low: float = 0.01,
        high: float = 0.1,
        trigger: int = 3,
    ) -> None:
        if per_class < 1 or replay_per_class < 1:
            raise WeightlabError(
                f"per_class and replay_per_class must be ≥ 1, got {per_class}, {replay_per_class}"
            )
        if not 0 <= low < high:
            raise WeightlabError(f"frequency band needs 0 ≤ low < high, got ({low}, {high}]")
        self.per_class, self.replay_per_class, self.low, self.high, self.trigger = (
            per_class,
            replay_per_class,
            low,
            high,
            trigger,
        )
        self.x = torch.zeros(num_classes, per_class, *sample_shape)  # (classes, per_class, ...)
        self.filled = torch.zeros(num_classes, dtype=torch.long)
        self.occurrences = torch.zeros(num_classes, dtype=torch.long)
        self.tasks_seen = torch.zeros((), dtype=torch.long)

    def classes_to_replay(self, current: Sequence[int]) -> list[int]:
        """The classes to replay alongside a task of ``current`` classes."""
        n = int(self.tasks_seen)
        if n == 0:
            return []
        occ = self.occurrences.tolist()
        chosen: list[int] = []
        for c in sorted(
            (k for k in range(len(occ)) if occ[k] > 0), key=lambda k: (occ[k], k)
        ):  # rarest first
            if len(chosen) == len(current):
                break
            if c in current or occ[c] < self.trigger:
                continue
            freq = occ[c] / n
            if freq > self.high:
                break  # every later class is more frequent still
            if freq > self.low:
                chosen.append(c)
        return chosen

    def replay_data(self, classes: Sequence[int], *, generator: torch.Generator) -> ArrayDataset | None:
        parts = []
        for c in classes:
            k = int(self.filled[c])
            idx = torch.randperm(k, generator=generator)[: self.replay_per_class]
            parts.append(ArrayDataset(self.x[c, idx], torch.full((len(idx),), c, dtype=torch.long)))
        return concat(parts) if parts else None

    def observe(
        self,
        data: ArrayDataset,
        classes: Sequence[int],
        replayed: Sequence[int],
        *,
        generator: torch.Generator,
    ) -> None:
        """After a task: store/renew samples of its ``classes`` and count them and the ``replayed`` ones."""
        for c in classes:
            own = torch.nonzero(data.y == c).flatten()
            own = own[torch.randperm(len(own), generator=generator)]
            k = int(self.filled[c])
            if k == 0:
                n = min(self.per_class, len(own))
                self.x[c, :n] = data.x[own[:n]]
                self.filled[c] = n
            else:
                n = min(
                    max(self.per_class // (int(self.occurrences[c]) + 1), self.per_class // 20), len(own), k
                )
                slots = torch.randperm(k, generator=generator)[:n]
                self.x[c, slots] = data.x[own[:n]]
        for c in (*classes, *replayed):
            self.occurrences[c] += 1
        self.tasks_seen += 1

    def state(self, prefix: str = "freq") -> dict[str, Tensor]:
        return {
            f"{prefix}.x": self.x,
            f"{prefix}.filled": self.filled,
            f"{prefix}.occurrences": self.occurrences,
            f"{prefix}.tasks_seen": self.tasks_seen,
        }

    def load(self, tensors: dict[str, Tensor], prefix: str = "freq") -> None:
        for name in ("x", "filled", "occurrences", "tasks_seen"):
            getattr(self, name).copy_(tensors[f"{prefix}.{name}"])
