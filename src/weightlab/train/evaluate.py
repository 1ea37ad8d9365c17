"""Evaluation: predictions, accuracy, and the accuracy matrix of a continual run."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from weightlab import distributed
from weightlab.data.arrays import ArrayDataset, Batch
from weightlab.train.loop import ForwardFn, default_forward


def _eval_batches(data: Dataset, batch_size: int):
    if isinstance(data, ArrayDataset):
        return data.batches(batch_size)
    return (Batch(*b) for b in DataLoader(data, batch_size=batch_size))


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, *, batch_size: int = 512,
            forward: ForwardFn = default_forward) -> tuple[Tensor, Tensor]:
    """Logits ``(N, classes)`` and targets ``(N,)`` of ``model`` on ``data`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, targets = [], []
    try:
        for batch in _eval_batches(data, batch_size):
            logits.append(forward(model, batch.to(device)).float().cpu())
            targets.append(batch.y)
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 512, forward: ForwardFn = default_forward) -> float:
    """Top-1 accuracy in [0, 1]. Under ``torchrun`` each rank scores its shard and the counts are summed."""
    if len(data) == 0:  # type: ignore[arg-type]
        return float("nan")
    if distributed.is_distributed():
        idx = distributed.shard(torch.arange(len(data)))  # type: ignore[arg-type]
        data = data.subset(idx) if isinstance(data, ArrayDataset) else Subset(data, idx.tolist())
    hits, n = 0, len(data)  # type: ignore[arg-type]
    if n:
        logits, targets = predict(model, data, batch_size=batch_size, forward=forward)
        hits = (logits.argmax(1) == targets).sum().item()
    counts = torch.tensor([hits, n], dtype=torch.float64)
    correct, total = distributed.all_reduce_sum(counts).tolist()
    return correct / total


def per_class_accuracy(logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class ``(num_classes,)`` (NaN for classes with no samples)."""
    correct = (logits.argmax(1) == targets).float()
    hits = torch.zeros(num_classes).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes).float()
    return hits / counts.where(counts > 0, torch.tensor(float("nan")))


def accuracy_row(model: nn.Module, tests: Sequence[Dataset], *, forward: ForwardFn = default_forward) -> list[float]:
    """One row of the accuracy matrix: accuracy on each task's test data."""
    return [accuracy(model, d, forward=forward) for d in tests]
