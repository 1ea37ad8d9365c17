"""Classifier heads for continual learning: one head per task, and a head that grows with new classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ExpandableHead(nn.Module):
    """A linear classifier whose output rows can be added (class-incremental learning).

    ``expand(n_new)`` appends ``n_new`` freshly initialised rows and keeps the old rows unchanged.
    """

    def __init__(self, in_features: int, num_classes: int = 0, *, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.use_bias = bias
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0)) if bias else None
        if num_classes:
            self.expand(num_classes)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def expand(self, n_new: int) -> None:
        fresh = nn.Linear(self.in_features, n_new, bias=self.use_bias).to(self.weight.device, self.weight.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data]))
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data]))

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
