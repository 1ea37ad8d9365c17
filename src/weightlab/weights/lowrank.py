"""Low-rank approximation and sparse-mask selection over weight matrices (LIFT, ``lift``).

Every selector returns the **sorted flat indices** ``(k,)`` (int64) of the chosen entries of an ``(m, n)``
matrix, so a mask costs O(k) memory; :func:`indices_to_mask` turns them into a dense boolean mask when one
is needed.

    idx = principal_weight_mask(W, rank=64, k=lora_budget(W.shape, 128))   # LIFT's principal weights
    idx = magnitude_mask(W, k)                                              # baseline: top-|W|
    idx = random_mask(W.shape, k, generator=g)                              # baseline: uniform
    idx = gradient_mask(W.grad, k)                                          # baseline: top-|grad|

The principal-weight mask follows Liu et al. (ICML 2025, arXiv 2506.00772): approximate ``W`` by its best
rank-``r`` matrix ``W_r = U_r diag(S_r) V_rᵀ`` and keep the ``k`` entries of largest ``|W_r|``. The official
code's released configs keep the *smallest* entries (``largest=False``); the paper — and the default
here — keeps the largest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from weightlab.errors import WeightlabError


def lora_budget(shape: Sequence[int], lora_rank: int) -> int:
    """The parameter count of a rank-``lora_rank`` LoRA on an ``(m, n)`` matrix: ``min((m + n)·r, m·n)``."""
    m, n = _shape2(shape)
    if lora_rank < 1:
        raise WeightlabError(f"lora_rank must be ≥ 1, got {lora_rank}")
    return min((m + n) * lora_rank, m * n)


def density_budget(shape: Sequence[int], density: float) -> int:
    """``round(density · m · n)`` entries, at least 1."""
    m, n = _shape2(shape)
    if not 0 < density <= 1:
        raise WeightlabError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * m * n))


def low_rank_approximation(weight: Tensor, rank: int, *, randomized: bool = False, niter: int = 4,
                           oversample: int | None = None) -> Tensor:
    """The rank-``rank`` approximation ``U_r diag(S_r) V_rᵀ`` of ``weight`` ``(m, n)``, in float32.

    Args:
        rank: kept singular values, ``1 ≤ rank ≤ min(m, n)``.
        randomized: use :func:`torch.svd_lowrank` (Halko et al.) with ``q = min(oversample, min(m, n))``
            columns and ``niter`` power iterations instead of the exact SVD.
        oversample: ``q`` of the randomized SVD (default ``2·rank``, as in the official code).

    Raises:
        WeightlabError: ``weight`` is not 2-D or ``rank`` is outside ``[1, min(m, n)]``.
    """
    m, n = _shape2(weight.shape)
    if not 1 <= rank <= min(m, n):
        raise WeightlabError(f"rank {rank} is not in [1, min(m, n)] = [1, {min(m, n)}] for a {m}×{n} matrix")
    w = weight.detach().float()  # (m, n)
    if randomized:
        q = min(oversample or 2 * rank, m, n)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)  # (m, q), (q,), (n, q)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (m, p), (p,), (p, n)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]  # (m, n)


def top_k_indices(scores: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Sorted flat indices ``(k,)`` of the ``k`` largest (or smallest) entries of ``scores``."""
    _check_k(k, scores.numel(), tuple(scores.shape))
    idx = torch.topk(scores.reshape(-1), k, largest=largest, sorted=False).indices
    return idx.sort().values


def principal_weight_mask(weight: Tensor, rank: int, k: int, *, randomized: bool = False, niter: int = 4,
                          largest: bool = True) -> Tensor:
    """LIFT's principal weights: top-``k`` of ``|W_r|`` where ``W_r`` is the rank-``rank`` approximation.

    Args:
        weight: ``(m, n)`` matrix (any float dtype; computed in float32).
        rank: the filter rank ``r`` of the low-rank approximation.
        k: number of entries to keep, ``1 ≤ k ≤ m·n``.
        randomized: select from a randomized SVD (:func:`torch.svd_lowrank`) instead of the exact one.
        largest: keep the largest entries (the paper); ``False`` reproduces the released configs' smallest.

    Returns:
        Sorted flat indices ``(k,)`` into ``weight.view(-1)``.
    """
    _check_k(k, weight.numel(), tuple(weight.shape))
    approx = low_rank_approximation(weight, rank, randomized=randomized, niter=niter)  # (m, n)
    return top_k_indices(approx.abs(), k, largest=largest)


def magnitude_mask(weight: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Top-``k`` of ``|W|`` (magnitude sparse fine-tuning, the baseline LIFT improves on)."""
    return top_k_indices(weight.detach().abs(), k, largest=largest)


def gradient_mask(grad: Tensor, k: int) -> Tensor:
    """Top-``k`` of ``|∇W|`` (gradient-magnitude sparse fine-tuning)."""
    return top_k_indices(grad.detach().abs(), k)


def random_mask(shape: Sequence[int], k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``k`` entries drawn uniformly without replacement (sorted flat indices)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    _check_k(k, numel, tuple(shape))
    return torch.randperm(numel, generator=generator)[:k].sort().values


def indices_to_mask(indices: Tensor, shape: Sequence[int]) -> Tensor:
    """Dense boolean mask of ``shape`` that is True at the flat ``indices``."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool, device=indices.device)
    mask.view(-1)[indices.long()] = True
    return mask


def mask_overlap(a: Tensor, b: Tensor) -> float:
    """``|a ∩ b| / |a|`` for two index sets of equal size (1 = same mask)."""
    if a.numel() == 0:
        return float("nan")
    return torch.isin(a, b).sum().item() / a.numel()


def carry_over(old_indices: Tensor, new_indices: Tensor, values: Tensor) -> Tensor:
    """Re-index per-entry ``values`` ``(k_old,)`` from sorted ``old_indices`` to sorted ``new_indices``.

    Entries in both masks keep their value; entries new to the mask get 0 (how LIFT carries the Adam moments
    across a mask refresh).
    """
    old, new = old_indices.long(), new_indices.long()
    out = torch.zeros(new.shape[0], dtype=values.dtype, device=values.device)  # (k_new,)
    if old.numel() == 0:
        return out
    pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)  # (k_new,)
    kept = old[pos] == new
    out[kept] = values[pos[kept]]
    return out


def _shape2(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise WeightlabError(f"expected a 2-D weight matrix, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_k(k: int, numel: int, shape: tuple[int, ...]) -> None:
    if not 1 <= k <= numel:
        raise WeightlabError(f"k = {k} entries is not in [1, {numel}] for a matrix of shape {shape}")
