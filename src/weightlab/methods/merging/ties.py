"""TIES merging over state dicts: trim, elect sign, disjoint merge (Yadav et al. 2023; as run by the
``tall-masks`` reference code: global top-k over the whole model, ``"mean"`` for the TIES baseline and
``"sum"`` inside TALL masks / Consensus)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.merging.task_arithmetic import StateDict, check_vectors, stack
from weightlab.weights import merge_ops

REDUCES = ("mean", "sum")
SCOPES = ("global", "tensor")


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise WeightlabError(f"density must be in (0, 1], got {density}")


def check_ties_options(density: float, reduce: str, scope: str) -> None:
    check_density(density)
    if reduce not in REDUCES:
        raise WeightlabError(f"reduce must be one of {', '.join(REDUCES)}, got {reduce!r}")
    if scope not in SCOPES:
        raise WeightlabError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def global_thresholds(vectors: Sequence[Mapping[str, Tensor]], density: float) -> Tensor:
    """Each task's trim threshold ``(T,)`` over all its entries (the reference's flattened model)."""
    keys = check_vectors(vectors)
    dtype = merge_ops.compute_dtype(vectors[0][keys[0]].dtype)  # float64 vectors keep float64 thresholds
    flat = torch.stack([torch.cat([v[k].reshape(-1).to(dtype) for k in keys]) for v in vectors])  # (T, d)
    return merge_ops.trim_thresholds(flat, density)


def ties_merge(
    vectors: Sequence[Mapping[str, Tensor]],
    *,
    density: float = 0.2,
    reduce: str = "mean",
    scope: str = "global",
) -> StateDict:
    """The TIES multi-task vector (unscaled).

    Args:
        vectors: task vectors τ_t (state dicts with the same keys and shapes).
        density: fraction of entries kept per task (the paper's k = 20%).
        reduce: ``"mean"`` (disjoint mean, the TIES paper) or ``"sum"`` (disjoint sum, inside TALL/Consensus).
        scope: ``"global"`` trims over the whole model and takes the majority sign over it (the reference
            code); ``"tensor"`` does both per tensor (as mergekit trims; a streaming merge needs one pass).
    """
    check_ties_options(density, reduce, scope)
    keys = check_vectors(vectors)
    if scope == "tensor":
        return {
            k: merge_ops.ties_tensor(s, thresholds=merge_ops.trim_thresholds(s, density), reduce=reduce)
            for k in keys
            for s in [stack(vectors, k)]
        }
    thresholds = global_thresholds(vectors, density)
    trimmed = {k: merge_ops.trim(stack(vectors, k), thresholds) for k in keys}
    majority = merge_ops.majority_sign(torch.stack([merge_ops.raw_sign(t).sum() for t in trimmed.values()]))
    return {
        k: merge_ops.disjoint_merge(t, merge_ops.elect_sign(t, majority), reduce) for k, t in trimmed.items()
    }


def magnitude_masks(vectors: Sequence[Mapping[str, Tensor]], *, density: float = 0.1) -> list[StateDict]:
    """Per-task top-``density`` masks of ``|τ_t|`` over the whole model (the magnitude-masking baseline)."""
    check_density(density)
    thresholds = global_thresholds(vectors, density)
    return [{k: v[k].abs() >= thresholds[t].to(v[k].dtype) for k in v} for t, v in enumerate(vectors)]
