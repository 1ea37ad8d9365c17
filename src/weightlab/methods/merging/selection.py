"""Choosing λ_t and α on validation data, as the ``tall-masks`` reference code does.

* each task's λ_t maximizes that task's validation score of ``θ_0 + m_t(λ) ∘ τ_MTL`` over {0.2, …, 0.6};
* a merge's α maximizes the average *normalized* validation accuracy (merged / fine-tuned) over {0.1, …, 1.0}.

Ties go to the first value of the grid. Scores come from a callback, so any model and data work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.merging.tall_masks import ALPHA_GRID, LAMBDA_GRID, tall_masks
from weightlab.methods.merging.task_arithmetic import StateDict, apply


def select_lambdas(
    base: Mapping[str, Tensor],
    tau_mtl: Mapping[str, Tensor],
    vectors: Sequence[Mapping[str, Tensor]],
    evaluate: Callable[[int, StateDict], float],
    *,
    grid: Sequence[float] = LAMBDA_GRID,
) -> tuple[list[float], list[StateDict], list[float]]:
    """Per task: the best λ, its mask and its validation score.

    Args:
        evaluate: ``evaluate(task, state_dict)``: the task's validation score of a full state dict.
    """
    if not grid:
        raise WeightlabError("the lambda grid is empty")
    lambdas, masks, scores = [], [], []
    for t, tau in enumerate(vectors):
        best: tuple[float, float, StateDict] | None = None
        for lam in grid:
            (mask,) = tall_masks([tau], tau_mtl, lam)
            score = float(evaluate(t, apply(base, tau_mtl, 1.0, mask)))
            if best is None or score > best[0]:
                best = (score, float(lam), mask)
        assert best is not None
        scores.append(best[0])
        lambdas.append(best[1])
        masks.append(best[2])
    return lambdas, masks, scores


def normalized_average(scores: Sequence[float], finetuned: Sequence[float]) -> float:
    """Mean over tasks of ``score_t / finetuned_t``."""
    if len(scores) != len(finetuned) or not scores:
        raise WeightlabError(f"expected one fine-tuned score per task ({len(scores)}), got {len(finetuned)}")
    return sum(s / f for s, f in zip(scores, finetuned, strict=True)) / len(scores)


def select_alpha(
    base: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    evaluate: Callable[[StateDict], Sequence[float]],
    finetuned: Sequence[float],
    *,
    grid: Sequence[float] = ALPHA_GRID,
) -> tuple[float, float]:
    """The α of ``grid`` with the highest average normalized validation accuracy, and that accuracy.

    Args:
        evaluate: ``evaluate(state_dict)``: the validation score of every task (a sequence of T floats).
        finetuned: the fine-tuned models' validation scores (the normalizers).
    """
    if not grid:
        raise WeightlabError("the alpha grid is empty")
    best: tuple[float, float] | None = None
    for alpha in grid:
        score = normalized_average(list(evaluate(apply(base, vector, float(alpha)))), finetuned)
        if best is None or score > best[1]:
            best = (float(alpha), score)
    assert best is not None
    return best
