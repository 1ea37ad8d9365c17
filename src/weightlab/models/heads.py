"""Classifier heads for continual learning: one head per task, and a head that grows with new classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError

HeadInit = Literal["pycil", "linear"]


class ExpandableHead(nn.Module):
    """A linear classifier whose output rows can be added (class-incremental learning).

    ``expand(n_new)`` appends ``n_new`` freshly initialised rows and keeps the old rows unchanged. New rows
    are initialised as PyCIL's ``SimpleLinear`` does (``init="pycil"``, the default, spec/continual.md §1.1):
    ``kaiming_uniform_(W, nonlinearity="linear")``, i.e. ``U(−√(3/fan_in), √(3/fan_in))``, and zero bias;
    ``init="linear"`` keeps ``nn.Linear``'s default (``U(−1/√fan_in, 1/√fan_in)`` for weight and bias, √3
    shorter rows).
    """

    def __init__(self, in_features: int, num_classes: int = 0, *, bias: bool = True,
                 init: HeadInit = "pycil") -> None:
        super().__init__()
        if init not in ("pycil", "linear"):
            raise WeightlabError(f"ExpandableHead init must be 'pycil' or 'linear', got {init!r}")
        self.in_features = in_features
        self.use_bias = bias
        self.init = init
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None
        if num_classes:
            self.expand(num_classes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def expand(self, n_new: int) -> None:
        if self.init == "linear":
            fresh = nn.Linear(self.in_features, n_new, bias=self.use_bias).to(self.weight.device, self.weight.dtype)
            weight, bias = fresh.weight.data, fresh.bias.data if self.use_bias else None
        else:
            weight = torch.empty(n_new, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
            nn.init.kaiming_uniform_(weight, nonlinearity="linear")  # (n_new, in_features)
            bias = torch.zeros(n_new, device=self.weight.device, dtype=self.weight.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.data, weight]))
        if self.bias is not None and bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias.data, bias]))

    def forward(self, features: Tensor) -> Tensor:  # (B, F) -> (B, classes)
        return nn.functional.linear(features, self.weight, self.bias)


class MultiHead(nn.Module):
    """One linear head per task; ``forward(features, task_id)`` routes each sample to its task's head.

    Heads may have different sizes; outputs are padded with ``-inf`` to the widest head so that a batch with
    mixed task ids still gives one ``(B, max_classes)`` tensor whose argmax is within the task's classes.
    """

    def __init__(self, in_features: int, classes_per_task: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, c) for c in classes_per_task)

    def forward(self, features: Tensor, task_id: int | Tensor) -> Tensor:
        if isinstance(task_id, int):
            return self.heads[task_id](features)
        width = max(h.out_features for h in self.heads)
        out = features.new_full((features.shape[0], width), float("-inf"))
        for t in torch.unique(task_id).tolist():
            rows = task_id == t
            logits = self.heads[t](features[rows])
            out[rows, : logits.shape[1]] = logits
        return out
