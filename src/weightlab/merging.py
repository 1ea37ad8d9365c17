"""Model merging and compression (paper key ``tall-masks``): the flat public API.

    from weightlab import merging
    taus = merging.task_vectors(base, [ft_a, ft_b, ft_c])
    tau = merging.task_arithmetic(taus)                      # Σ τ_t
    masks = merging.tall_masks(taus, tau, lambdas=0.4)       # |τ_t| > λ |τ − τ_t|
    merged = merging.apply(base, tau, alpha=0.4, mask=merging.consensus_mask(masks, k=2))

Every function takes and returns state dicts (``dict[str, Tensor]``) and never modifies its inputs; the
tensor-level operations they are built from are in :mod:`weightlab.weights.merge_ops`, and the streaming
versions for checkpoints on disk (``merge_checkpoints``, ``compress``, ``extract``) read one tensor at a time.
"""

from weightlab.methods.merging.consensus import agreement_histogram, consensus_mask, mask_agreement, masked
from weightlab.methods.merging.selection import normalized_average, select_alpha, select_lambdas
from weightlab.methods.merging.store import compress, extract, read_manifest, storage_bits
from weightlab.methods.merging.streaming import MergeConfig, merge_checkpoints
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
    "MergeConfig",
    "TallMasks",
    "TallMasksConfig",
    "agreement_histogram",
    "apply",
    "compress",
    "consensus_mask",
    "extract",
    "magnitude_masks",
    "mask_agreement",
    "masked",
    "merge_checkpoints",
    "normalized_average",
    "read_manifest",
    "select_alpha",
    "select_lambdas",
    "storage_bits",
    "tall_masks",
    "task_arithmetic",
    "task_vectors",
    "ties_merge",
]


# ------------------------------------------------------------------------------------------------ registry
# Every merge method as one function from task vectors to a multi-task vector (scale it with ``apply``), with
# the paper's defaults. ``tests/test_merging_conformance.py`` runs every registered method through the same
# checks: inputs unchanged, finite, deterministic, identity at zero strength.
from weightlab.registry import register


def _consensus(vectors, *, merge, lambdas: float = 0.4, k: int = 2):
    merged = merge(vectors)
    return masked(merged, consensus_mask(tall_masks(vectors, merged, lambdas), k=k))


register("merge", "task-arithmetic")(task_arithmetic)
register("merge", "weight-averaging")(
    lambda vectors: {k: v / len(vectors) for k, v in task_arithmetic(vectors).items()})
register("merge", "ties")(lambda vectors: ties_merge(vectors, density=0.2, reduce="mean"))
register("merge", "consensus-ta")(lambda vectors: _consensus(vectors, merge=task_arithmetic))
register("merge", "consensus-ties")(
    lambda vectors: _consensus(vectors, merge=lambda v: ties_merge(v, density=0.2, reduce="sum")))
