"""Continual-learning metrics over the accuracy matrix ``R``.

``R[i, j]`` is the accuracy on task ``j`` after training through task ``i`` (0-indexed, ``T`` tasks, a
``T × T`` tensor or array). Every function returns a Python float.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from weightlab.errors import WeightlabError

MatrixLike = Tensor | np.ndarray | Sequence[Sequence[float]]


def _matrix(R: MatrixLike) -> Tensor:
    m = torch.as_tensor(np.asarray(R, dtype=np.float64))
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise WeightlabError(f"the accuracy matrix must be square T×T with T ≥ 1, got shape {tuple(m.shape)}")
    return m


def average_accuracy(R: MatrixLike) -> float:
    """A_T = (1/T) Σ_j R[T−1, j]: the mean of the last row."""
    return _matrix(R)[-1].mean().item()


def forgetting(R: MatrixLike) -> float:
    """Chaudhry et al. (2018), max-based: f_j = max_{l < T−1} R[l, j] − R[T−1, j] for j < T−1;
    F = mean of the f_j. Zero for a single task."""
    m = _matrix(R)
    T = m.shape[0]
    if T == 1:
        return 0.0
    best = m[: T - 1, : T - 1].max(dim=0).values  # best earlier accuracy of each old task
    return (best - m[T - 1, : T - 1]).mean().item()


def forgetting_avalanche(R: MatrixLike) -> float:
    """Avalanche's variant: f_j = R[j, j] − R[T−1, j] (accuracy right after learning j, minus the last)."""
    m = _matrix(R)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return (torch.diagonal(m)[: T - 1] - m[T - 1, : T - 1]).mean().item()


def backward_transfer(R: MatrixLike) -> float:
    """Lopez-Paz & Ranzato (2017): BWT = (1/(T−1)) Σ_{j<T−1} (R[T−1, j] − R[j, j])."""
    m = _matrix(R)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return (m[T - 1, : T - 1] - torch.diagonal(m)[: T - 1]).mean().item()


def forward_transfer(R: MatrixLike, baseline: Sequence[float] | Tensor | np.ndarray) -> float:
    """FWT = (1/(T−1)) Σ_{j≥1} (R[j−1, j] − b_j), with b_j the accuracy on task j of the untrained model."""
    m = _matrix(R)
    T = m.shape[0]
    b = torch.as_tensor(np.asarray(baseline, dtype=np.float64))
    if b.shape != (T,):
        raise WeightlabError(f"baseline must have one accuracy per task ({T}), got shape {tuple(b.shape)}")
    if T == 1:
        return 0.0
    return (torch.diagonal(m, offset=1) - b[1:]).mean().item()


def average_incremental_accuracy(accuracies: Sequence[float] | Tensor | np.ndarray) -> float:
    """iCaRL's Ā = (1/T) Σ_t Acc_t, with Acc_t the accuracy on all classes seen up to step t."""
    a = torch.as_tensor(np.asarray(accuracies, dtype=np.float64))
    if a.ndim != 1 or a.numel() == 0:
        raise WeightlabError(f"expected a non-empty 1-D sequence of accuracies, got shape {tuple(a.shape)}")
    return a.mean().item()
