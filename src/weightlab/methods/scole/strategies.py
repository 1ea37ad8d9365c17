"""SCoLe's strategies (paper key ``scole``; Lesort et al., CoLLAs 2023; official code TLESORT/SCoLe-SCaling-
Continual-Learning, ``utils_training.py``, ``replay.py``). The stream generator itself lives in
:mod:`weightlab.data.scenarios` (:class:`~weightlab.data.scenarios.SCoLeConfig`, :func:`scole_tasks`,
:class:`SCoLeStream`).

* :class:`GroupMasking` masks the logits of classes absent from the mini-batch (training loss only);
  :class:`TaskOptimizer` resets the optimizer per task or keeps it; :class:`FrequencyReplay` replays the
  rarely seen classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, Batch, concat
from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import LoopState, TrainConfig, make_optimizer

# ---------------------------------------------------------------------------------------------- strategies


@register("method", "group-masking")
class GroupMasking(Callback):
    """Mask the logits of classes absent from the mini-batch before the training loss (per mini-batch).

    ``logits[:, c] = −1e9`` for every class ``c`` not among ``batch.y``; predictions are unaffected because
    the loop applies ``transform_logits`` to the training loss only. No host sync: the mask is built on
    device.
    """

    def transform_logits(self, state: LoopState, batch: Batch, logits: Tensor) -> Tensor:
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

    def state_dict(self, prefix: str = "optim") -> dict[str, Tensor]:
        if self.reset or self._optimizer is None:
            return {}
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        out = {}
        for i, p in enumerate(params):
            for name, value in self._optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    out[f"{prefix}.{i}.{name}"] = value
        return out

    def load_state_dict(self, tensors: dict[str, Tensor], prefix: str = "optim") -> None:
        if self.reset:
            return
        optimizer = self.get()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for key, value in tensors.items():
            if key.startswith(prefix + "."):
                _, index, name = key.split(".", 2)
                param = params[int(index)]  # moments go to the parameter's device; Adam keeps "step" on the CPU
                optimizer.state[param][name] = value.clone() if name == "step" else value.to(param.device, copy=True)


@register("method", "frequency-replay")
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

    def state_dict(self, prefix: str = "freq") -> dict[str, Tensor]:
        return {
            f"{prefix}.x": self.x,
            f"{prefix}.filled": self.filled,
            f"{prefix}.occurrences": self.occurrences,
            f"{prefix}.tasks_seen": self.tasks_seen,
        }

    def load_state_dict(self, tensors: dict[str, Tensor], prefix: str = "freq") -> None:
        for name in ("x", "filled", "occurrences", "tasks_seen"):
            getattr(self, name).copy_(tensors[f"{prefix}.{name}"])
