"""Evaluation: predictions, accuracy, and the accuracy matrix of a continual run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from weightlab import distributed
from weightlab.data.arrays import DataLike, array_view, iter_batches, num_batches
from weightlab.train.loop import ForwardFn, default_forward


@torch.no_grad()
def predict(model: nn.Module, data: DataLike, *, batch_size: int = 512,
            forward: ForwardFn = default_forward) -> tuple[Tensor, Tensor]:
    """Logits ``(N, classes)`` and targets ``(N,)`` of ``model`` on ``data`` in eval mode (mode restored).

    ``data``: an ArrayDataset, a TensorDataset, any map-style dataset of ``(x, y[, t])`` samples, or a
    DataLoader (iterated as it is)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, targets = [], []
    try:
        for batch in iter_batches(data, batch_size):
            logits.append(forward(model, batch.to(device)).float().cpu())
            targets.append(batch.y)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def accuracy(model: nn.Module, data: DataLike, *, batch_size: int = 512,
             forward: ForwardFn = default_forward) -> float:
    """Top-1 accuracy in [0, 1] on any dataset or DataLoader (NaN when it is empty). Under ``torchrun`` each
    rank scores its shard of a dataset and the counts are summed (every rank scores all of a DataLoader)."""
    if num_batches(data, batch_size) == 0:
        return float("nan")
    if distributed.is_distributed() and not isinstance(data, DataLoader):
        idx = distributed.shard(torch.arange(len(data)))  # type: ignore[arg-type]
        view = array_view(data)
        data = view.subset(idx) if view is not None else Subset(data, idx.tolist())
    hits, n = 0, 0
    if num_batches(data, batch_size):
        logits, targets = predict(model, data, batch_size=batch_size, forward=forward)
        hits, n = (logits.argmax(1) == targets).sum().item(), len(targets)
    counts = torch.tensor([hits, n], dtype=torch.float64)
    correct, total = distributed.all_reduce_sum(counts).tolist()
    return correct / total


def per_class_accuracy(logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class ``(num_classes,)`` (NaN for classes with no samples)."""
    correct = (logits.argmax(1) == targets).float()
    hits = torch.zeros(num_classes).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes).float()
    return hits / counts.where(counts > 0, torch.tensor(float("nan")))


def accuracy_row(model: nn.Module, tests: Sequence[DataLike], *, forward: ForwardFn = default_forward) -> list[float]:
    """One row of the accuracy matrix: accuracy on each task's test data."""
    return [accuracy(model, d, forward=forward) for d in tests]
