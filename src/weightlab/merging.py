"""Model merging and compression (paper key ``tall-masks``): the flat public API.

    from weightlab import merging
    taus = merging.task_vectors(base, [ft_a, ft_b, ft_c])
    tau = merging.task_arithmetic(taus)                      # Σ τ_t
    masks = merging.tall_masks(taus, tau, lambdas=0.4)       # |τ_t| > λ |τ − τ_t|
    merged = merging.apply(base, tau, alpha=0.4, mask=merging.consensus_mask(masks, k=2))
    soup = merging.merge(base, [ft_a, ft_b], "dare-ties", density=0.3, seed=0)   # any method of the table

Every function takes and returns state dicts (``dict[str, Tensor]``) and never modifies its inputs; the
tensor-level operations they are built from are in :mod:`weightlab.weights.merge_ops`, and the streaming
versions for checkpoints on disk (``merge_checkpoints``, ``compress``, ``extract``) read one tensor at a time.
``merge`` / ``merge_checkpoints`` run any method of the one table of merge methods (``METHODS``) in memory or
streamed from disk; ``load_recipe`` reads a mergekit-style YAML recipe and ``run_plan`` runs it.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from weightlab.methods.merging.checkpoints import Source
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.consensus import agreement_histogram, consensus_mask, mask_agreement, masked
from weightlab.methods.merging.execute import merge_checkpoints, merge_state_dicts
from weightlab.methods.merging.methods import NAMES as METHODS
from weightlab.methods.merging.methods import MergeMethod
from weightlab.methods.merging.recipe import MergePlan, load_recipe, run_plan
from weightlab.methods.merging.selection import normalized_average, select_alpha, select_lambdas
from weightlab.methods.merging.store import compress, extract, read_manifest, storage_bits
from weightlab.methods.merging.tall_masks import (
    ALPHA_GRID,
    LAMBDA_GRID,
    TallMasks,
    TallMasksConfig,
    tall_masks,
)
from weightlab.methods.merging.task_arithmetic import apply, task_arithmetic, task_vectors
from weightlab.methods.merging.ties import magnitude_masks, ties_merge

__all__ = [
    "ALPHA_GRID",
    "LAMBDA_GRID",
    "METHODS",
    "MergeConfig",
    "MergeMethod",
    "MergePlan",
    "Source",
    "TallMasks",
    "TallMasksConfig",
    "agreement_histogram",
    "apply",
    "compress",
    "consensus_mask",
    "extract",
    "load_recipe",
    "magnitude_masks",
    "mask_agreement",
    "masked",
    "merge",
    "merge_checkpoints",
    "merge_state_dicts",
    "normalized_average",
    "read_manifest",
    "run_plan",
    "select_alpha",
    "select_lambdas",
    "storage_bits",
    "tall_masks",
    "task_arithmetic",
    "task_vectors",
    "ties_merge",
]


# ------------------------------------------------------------------------------------------------ the table
# Every merge method is an entry of one table (methods.py), registered under the kind "merge"; ``merge`` runs
# any of them in memory, ``merge_checkpoints`` streams any of them from disk, with the same rules.


def merge(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str = "task-arithmetic",
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    **options: object,
) -> dict[str, Tensor]:
    """The merged state dict of ``finetuned`` on ``base`` by a method of the table.

    Args:
        method: a name of :data:`METHODS` (``task-arithmetic``, ``linear``, ``ties``, ``dare-ties``, ...).
        dtype: the floating-point dtype of the result (default: the base's).
        device: where the arithmetic runs (``cpu`` or ``cuda``).
        options: fields of :class:`MergeConfig` (``alpha``, ``weights``, ``density``, ``seed``, ``k``,
            ``lambdas``, ``t``, ``gamma``, ``normalize``, ``convention``, ...); sequences become tuples.
    """
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
    config = MergeConfig(method=method, **fields)  # type: ignore[arg-type]
    return merge_state_dicts(base, finetuned, config, dtype=dtype, device=device)
