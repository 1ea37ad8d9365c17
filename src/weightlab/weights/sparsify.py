"""Sparsifying one task vector before a merge: magnitude top-k, Model Breadcrumbs, DARE's drop and rescale.

Pure functions over single tensors (any shape; they work on the flat ``(n,)`` tensors of a streamed merge as
well as on shaped ones). They return new tensors and never modify their inputs.

* :func:`magnitude_mask` keeps exactly ``max(1, ⌊ρ·n⌋)`` entries of largest magnitude (mergekit's
  ``magnitude``, the TIES paper's "top-k%"); among equal magnitudes at the cut the first in memory order wins
  (a stable sort), where mergekit leaves the choice to an unstable sort.
* :func:`outlier_mask` is Model Breadcrumbs (Davari & Belilovsky, 2023; paper key ``breadcrumbs``): drop the
  ``⌊γ·n⌋`` largest magnitudes (outliers), then keep the next ``⌊ρ·n⌋``; the smallest are dropped too.
* :func:`random_mask` / :func:`drop_and_rescale` are DARE (Yu et al., 2024; paper key ``dare``): keep each
  entry with probability ``ρ`` (a seeded generator, so a merge is reproducible) and divide the survivors by
  ``ρ`` so the expected task vector is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _order(x: Tensor, *, descending: bool) -> Tensor:
    """Indices of ``x.reshape(-1)`` sorted by magnitude (stable, so ties keep memory order)."""
    return torch.sort(x.reshape(-1).abs().to(torch.float32), descending=descending, stable=True).indices


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """The bool mask ``(x.shape)`` of the ``max(1, ⌊density·n⌋)`` largest ``|x|`` (all of them for ρ ≥ 1)."""
    n = x.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(x, dtype=torch.bool)
    keep = max(1, int(density * n))
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[_order(x, descending=True)[:keep]] = True
    return mask.reshape(x.shape)


def outlier_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``⌊γ·n⌋`` largest ``|x|``, keep the next ``⌊ρ·n⌋`` (bool, ``x.shape``).

    When ``ρ + γ > 1`` fewer outliers are dropped, so that ``⌊ρ·n⌋`` entries are always kept (as mergekit's
    ``magnitude_outliers``); ``ρ ≥ 1`` keeps everything.
    """
    n = x.numel()
    if density >= 1 or n == 0:
        return torch.ones_like(x, dtype=torch.bool)
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))  # entries dropped from the small end
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[_order(x, descending=False)[bottom : bottom + keep]] = True
    return mask.reshape(x.shape)


def random_mask(shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator) -> Tensor:
    """DARE's keep mask: each entry kept with probability ``density`` (bool, CPU; drawn from ``generator``)."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) < density


def drop_and_rescale(x: Tensor, keep: Tensor, density: float, *, rescale: bool = True) -> Tensor:
    """``x ∘ keep / ρ`` (DARE); without ``rescale`` just ``x ∘ keep``."""
    kept = x * keep.to(x.device)
    return kept / density if rescale and density < 1 else kept
