"""Consensus Merging and mask statistics (paper key ``tall-masks``).

``consensus_mask`` keeps the weights that at least ``k`` tasks use (``k = 2`` removes the *catastrophic*
weights no task uses and the *selfish* weights exactly one task uses); ``mask_agreement`` counts, for every
weight, in how many tasks' TALL masks it is active.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.merging.task_arithmetic import StateDict, check_vectors, stack
from weightlab.weights import merge_ops


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise WeightlabError(f"k must be an integer ≥ 0, got {k!r}")


def mask_agreement(masks: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """For every weight, in how many of the task masks it is active (int16 state dict)."""
    keys = check_vectors(masks)
    return {k: merge_ops.agreement(stack(masks, k)) for k in keys}


def consensus_mask(masks: Sequence[Mapping[str, Tensor]], k: int = 2) -> StateDict:
    """``Σ_t m_t ≥ k`` as one bool state dict (k = 0 keeps everything, k > T keeps nothing)."""
    check_k(k)
    return {key: count >= k for key, count in mask_agreement(masks).items()}


def agreement_histogram(counts: Mapping[str, Tensor], n_tasks: int) -> list[int]:
    """How many weights are active in exactly ``0, 1, …, n_tasks`` tasks (0: catastrophic, 1: selfish)."""
    if n_tasks < 1:
        raise WeightlabError(f"n_tasks must be ≥ 1, got {n_tasks}")
    hist = torch.zeros(n_tasks + 1, dtype=torch.long)
    for c in counts.values():
        hist += torch.bincount(c.reshape(-1).long(), minlength=n_tasks + 1)[: n_tasks + 1]
    return hist.tolist()


def masked(vector: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> StateDict:
    """``mask ∘ vector`` key by key."""
    return {k: v * mask[k] for k, v in vector.items()}
