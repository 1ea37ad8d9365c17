"""Weighted sums of task vectors, with or without TIES sign consensus (mergekit's *generalized task
arithmetic*: task arithmetic, TIES, DARE and Model Breadcrumbs are this sum after different sparsifications).

For one key, with ``weighted = w ∘ δ`` the ``(T, n)`` stack of weighted (sparsified) task vectors:

* without consensus: ``Σ_t w_t δ_t``, divided by ``Σ_t w_t`` when normalising;
* with consensus: the elected sign is ``+`` where ``Σ_t w_t δ_t ≥ 0`` and ``−`` elsewhere (a zero sum goes to
  ``+``), only the entries of that sign are summed, and normalising divides by the sum of the weights of the
  entries that were kept there (1 where none was).

These follow mergekit's ``generalized_task_arithmetic`` operation for operation (the same masks as float
tensors, the same sums), so a float32 merge gives the same bits. The paper-reference TIES of
:mod:`weightlab.weights.merge_ops` differs on purpose (it keeps ``⌊ρd⌋ + 1`` entries, sends zero sums to the
majority sign and divides by a count); both are in the merge-method table.
"""

from __future__ import annotations

from torch import Tensor

NEAR_ZERO = 1e-8  # a sum of weights smaller than this is not divided by (as mergekit)


def column(weights: Tensor, like: Tensor) -> Tensor:
    """``weights`` ``(T,)`` shaped to broadcast over a ``(T, ...)`` stack ``like`` (its dtype and device)."""
    return weights.to(dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def sign_agreement(weighted: Tensor) -> Tensor:
    """``1.0`` where ``sign(w_t δ_t)`` is the elected sign of ``Σ_t w_t δ_t`` (zero sums elect ``+``), else 0."""
    elected = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1  # (...)
    return (weighted.sign() == elected).to(weighted.dtype)  # (T, ...)


def weighted_sum(weighted: Tensor, weights: Tensor, *, consensus: bool, normalize: bool) -> Tensor:
    """The merged task vector ``(...)`` of one key from ``weighted`` ``(T, ...)`` and ``weights`` ``(T,)``."""
    w = column(weights, weighted)
    if consensus:
        agree = sign_agreement(weighted)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < NEAR_ZERO] = 1
    return mixed / divisor if normalize else mixed
