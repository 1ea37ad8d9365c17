"""TALL masks: localize each task's information in a multi-task vector (paper key ``tall-masks``).

``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|``: a weight belongs to task ``t`` when the task's own change outweighs
(λ_t times) what the other tasks contribute there. ``θ_0 + m_t ∘ τ_MTL`` then recovers the fine-tuned
model of task ``t`` (compression), and the masks' overlap drives Consensus Merging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.merging import methods
from weightlab.methods.merging.consensus import check_k, consensus_mask, masked
from weightlab.methods.merging.task_arithmetic import (
    StateDict,
    apply,
    check_vectors,
    task_arithmetic,
    task_vectors,
)
from weightlab.methods.merging.ties import check_density, ties_merge
from weightlab.registry import register
from weightlab.weights import merge_ops

LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
MERGES = tuple(m.name for m in methods.TABLE if m.store)  # the table's names: task-arithmetic, ties


def check_lambda(lam: float) -> None:
    if not lam > 0 or lam != lam or lam == float("inf"):
        raise WeightlabError(f"lambda must be a finite number > 0, got {lam}")


def tall_masks(
    vectors: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor], lambdas: float | Sequence[float]
) -> list[StateDict]:
    """One bool mask state dict per task: ``|τ_t| > λ_t · |merged − τ_t|`` (strict, as the reference code).

    Args:
        vectors: task vectors τ_t.
        merged: the unscaled multi-task vector τ_MTL (task arithmetic sum or TIES disjoint sum).
        lambdas: one λ for all tasks or one per task.
    """
    keys = check_vectors(vectors)
    lams = (
        [float(lambdas)] * len(vectors) if isinstance(lambdas, (int, float)) else [float(x) for x in lambdas]
    )
    if len(lams) != len(vectors):
        raise WeightlabError(f"expected one lambda per task ({len(vectors)}), got {len(lams)}")
    for lam in lams:
        check_lambda(lam)
    missing = [k for k in keys if k not in merged]
    if missing:
        raise WeightlabError(
            f"the merged vector lacks {len(missing)} key(s) of the task vectors (first: {missing[0]!r})"
        )
    pairs = zip(vectors, lams, strict=True)
    return [{k: merge_ops.tall_mask(v[k], merged[k], lam) for k in keys} for v, lam in pairs]


@dataclass(frozen=True)
class TallMasksConfig:
    """TALL masks and Consensus Merging (Wang et al., ICML 2024; paper key ``tall-masks``).

    Attributes:
        merge: the multi-task vector the masks act on: ``"task-arithmetic"`` (sum) or ``"ties"`` (TIES disjoint
            sum), names of the merge-method table.
        density: TIES trim density (the paper's k = 20).
        lambdas: the grid λ_t is chosen from on each task's validation data.
        k: consensus threshold (tasks a weight must serve to survive).
    """

    merge: str = "task-arithmetic"
    density: float = 0.2
    lambdas: tuple[float, ...] = LAMBDA_GRID
    k: int = 2

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise WeightlabError(f"merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        check_density(self.density)
        if not self.lambdas:
            raise WeightlabError("lambdas must hold at least one value")
        for lam in self.lambdas:
            check_lambda(lam)
        check_k(self.k)


@register("method", "tall-masks")
class TallMasks:
    """Fit TALL masks on validation data (scikit-learn style: learned state ends in ``_``).

    tall = TallMasks(TallMasksConfig()).fit(base, finetuned, evaluate)
    theta_3 = tall.extract(3)            # θ_0 + m_3 ∘ τ_MTL
    consensus = tall.consensus_vector()  # m_cons ∘ τ_MTL (scale it with apply(base, ·, alpha))
    """

    def __init__(self, config: TallMasksConfig = TallMasksConfig()) -> None:
        self.config = config

    def fit(
        self,
        base: Mapping[str, Tensor],
        finetuned: Sequence[Mapping[str, Tensor]],
        evaluate: Callable[[int, StateDict], float],
    ) -> TallMasks:
        """Build τ_MTL; choose each task's λ by ``evaluate(task, θ_0 + m_t ∘ τ_MTL)`` (higher: better)."""
        from weightlab.methods.merging.selection import select_lambdas

        self.base_ = dict(base)
        vectors = task_vectors(base, finetuned)
        self.tau_mtl_ = self.multi_task_vector(vectors)
        self.lambdas_, self.masks_, self.scores_ = select_lambdas(
            base, self.tau_mtl_, vectors, evaluate, grid=self.config.lambdas
        )
        return self

    def multi_task_vector(self, vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
        if self.config.merge == "task-arithmetic":
            return task_arithmetic(vectors)
        return ties_merge(vectors, density=self.config.density, reduce="sum", scope="global")

    def extract(self, task: int) -> StateDict:
        """The reconstructed model of ``task``: ``θ_0 + m_t ∘ τ_MTL``."""
        return apply(self.base_, self.tau_mtl_, 1.0, self.masks_[task])

    def consensus_vector(self, k: int | None = None) -> StateDict:
        """``consensus_mask(masks, k) ∘ τ_MTL``."""
        return masked(self.tau_mtl_, consensus_mask(self.masks_, self.config.k if k is None else k))
