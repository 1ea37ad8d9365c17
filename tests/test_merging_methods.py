"""Known answers for the merge methods of the table and the pure ops under them (hand-computed tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from weightlab import merging
from weightlab.errors import WeightlabError
from weightlab.weights import interpolate, sparsify
from weightlab.weights.weighted_merge import sign_agreement, weighted_sum

BASE = {"w": torch.zeros(4)}
FTS = [{"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}, {"w": torch.tensor([-1.0, -1.0, 2.0, 4.0])}]


def test_magnitude_mask_keeps_exactly_floor_density_n_with_stable_ties() -> None:
    x = torch.tensor([0.1, -3.0, 2.0, 2.0, -0.5, 0.0])
    assert sparsify.magnitude_mask(x, 0.5).tolist() == [False, True, True, True, False, False]
    assert sparsify.magnitude_mask(x, 0.34).tolist() == [False, True, True, False, False, False]  # tie: first wins
    assert sparsify.magnitude_mask(x, 0.01).sum() == 1  # at least one
    assert sparsify.magnitude_mask(x, 1.0).all()


def test_outlier_mask_drops_the_largest_then_keeps_density() -> None:
    x = torch.tensor([10.0, -9.0, 1.0, 2.0, -3.0, 0.5, 0.1, 4.0, -5.0, 6.0])
    # gamma 0.2 drops 10 and -9; density 0.3 keeps the next three: 6, -5, 4
    assert sparsify.outlier_mask(x, 0.3, 0.2).nonzero().flatten().tolist() == [7, 8, 9]
    # density + gamma > 1: fewer outliers dropped so that 9 entries stay (only the largest goes)
    assert sparsify.outlier_mask(x, 0.9, 0.5).tolist() == [False] + [True] * 9


def test_dare_drops_at_rate_and_rescales_by_one_over_density() -> None:
    x = torch.full((20000,), 2.0)
    keep = sparsify.random_mask(x.shape, 0.25, torch.Generator().manual_seed(0))
    assert abs(keep.float().mean().item() - 0.25) < 0.02
    out = sparsify.drop_and_rescale(x, keep, 0.25)
    assert set(out.unique().tolist()) == {0.0, 8.0}
    assert torch.equal(keep, sparsify.random_mask(x.shape, 0.25, torch.Generator().manual_seed(0)))
    assert torch.equal(sparsify.drop_and_rescale(x, keep, 0.25, rescale=False), x * keep)


def test_sign_agreement_and_weighted_sum() -> None:
    weighted = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 0.0, -4.0]])  # sums 0, -3, 0, -1
    assert sign_agreement(weighted).tolist() == [[1, 1, 0, 0], [0, 1, 0, 1]]  # a zero sum elects +
    weights = torch.tensor([2.0, 0.5])
    assert weighted_sum(weighted, weights, consensus=True, normalize=False).tolist() == [1, -3, 0, -4]
    # divided by the weights of the kept entries, 1 where none was kept
    got = weighted_sum(weighted, weights, consensus=True, normalize=True).tolist()
    assert got == pytest.approx([0.5, -1.2, 0.0, -8.0])
    plain = weighted_sum(weighted, weights, consensus=False, normalize=True).tolist()
    assert plain == pytest.approx([0, -1.2, 0, -0.4])


def test_linear_and_slerp() -> None:
    models = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert interpolate.linear(models, torch.tensor([1.0, 3.0])).tolist() == [2.5, 5.0]
    assert interpolate.linear(models, torch.tensor([1.0, -1.0]), normalize=False).tolist() == [-2.0, -4.0]
    half = interpolate.slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), math.sqrt(2.0)]))  # the angle halves, norms blend
    assert torch.equal(interpolate.slerp(0.25, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])),
                       torch.tensor([1.25, 1.25]))  # parallel: linear
    assert torch.equal(interpolate.slerp(0.0, torch.tensor([1.0, 0.5]), torch.tensor([-3.0, 2.0])),
                       torch.tensor([1.0, 0.5]))


def test_task_arithmetic_with_weights_negation_and_alpha_above_one() -> None:
    got = merging.merge(BASE, FTS, "task-arithmetic", weights=(1.0, -0.5), alpha=1.5)["w"]
    assert got.tolist() == [2.25, -2.25, -0.75, -3.0]  # 1.5 · (τ_1 − 0.5 τ_2)
    normalized = merging.merge(BASE, FTS, "task-arithmetic", weights=(1.0, 3.0), normalize=True)["w"]
    assert normalized.tolist() == [-0.5, -1.25, 1.625, 3.0]


def test_ties_conventions() -> None:
    # mergekit: density 0.5 keeps 2 of 4 per model: [1, -2, 0, 0] and [0, 0, 2, 4]; elected signs +, -, +, +;
    # the disjoint mean of the agreeing entries
    got = merging.merge(BASE, FTS, "ties", convention="mergekit", scope="tensor", density=0.5, normalize=True)["w"]
    assert got.tolist() == [1.0, -2.0, 2.0, 4.0]
    weighted = merging.merge(BASE, FTS, "ties", convention="mergekit", scope="tensor", density=0.5,
                             weights=(2.0, 1.0), normalize=True)["w"]
    assert weighted.tolist() == [1.0, -2.0, 2.0, 4.0]  # weighted mean of one entry is that entry
    summed = merging.merge(BASE, FTS, "ties", convention="mergekit", scope="tensor", density=0.5,
                           weights=(2.0, 1.0), normalize=False)["w"]
    assert summed.tolist() == [2.0, -4.0, 2.0, 4.0]
    # the reference code keeps ⌊ρd⌋ + 1 = 3 per model and sends zero sums to the majority sign
    reference = merging.merge(BASE, FTS, "ties", density=0.5, scope="tensor")["w"]
    assert reference.tolist() == [1.0, -1.5, 1.25, 4.0]


def test_dare_breadcrumbs_and_slerp_through_the_table() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(1000)}
    fts = [{"w": torch.ones(1000)}, {"w": 3 * torch.ones(1000)}]
    dare = merging.merge(base, fts, "dare-ta", density=0.5, seed=1)["w"]
    assert set(dare.unique().tolist()) <= {0.0, 2.0, 6.0, 8.0}  # each kept entry rescaled by 2
    assert not torch.equal(dare, merging.merge(base, fts, "dare-ta", density=0.5, seed=2)["w"])
    assert torch.equal(dare, merging.merge(base, fts, "dare-ta", density=0.5, seed=1)["w"])
    x = {"w": torch.randn(100, generator=gen)}
    crumbs = merging.merge({"w": torch.zeros(100)}, [x, x], "breadcrumbs", density=0.5, gamma=0.1)["w"]
    mask = sparsify.outlier_mask(x["w"], 0.5, 0.1)
    assert torch.equal(crumbs, 2 * x["w"] * mask)
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    mid = merging.merge(a, [b], "slerp", t=0.5)["w"]
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5)] * 2))


@pytest.mark.parametrize(("options", "match"), [
    ({"method": "ties", "weights": (1.0, 2.0)}, "convention reference (the paper's code) takes no per-model"),
    ({"method": "ties", "convention": "mergekit"}, "trims per tensor; set scope to tensor"),
    ({"method": "ties", "convention": "paper"}, "convention must be one of reference, mergekit"),
    ({"method": "task-arithmetic", "alpha": float("nan")}, "alpha must be a finite number"),
    ({"method": "task-arithmetic", "weights": (1.0, float("inf"))}, "a weight must be a finite number"),
    ({"method": "dare-ta", "densities": (0.5, 0.0)}, "density must be in (0.0, 1.0]"),
    ({"method": "breadcrumbs", "gamma": 1.0}, "gamma must be in [0, 1)"),
    ({"method": "slerp", "t": 1.5}, "t must be in [0.0, 1.0]"),
    ({"method": "dare-ta", "seed": -1}, "seed must be an integer ≥ 0"),
    ({"method": "dare", "seed": 0}, "method must be one of"),
])
def test_bad_options_are_one_line_errors(options: dict, match: str) -> None:
    with pytest.raises(WeightlabError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        merging.MergeConfig(**options)


def test_model_counts_are_checked() -> None:
    with pytest.raises(WeightlabError, match="slerp merges the base with exactly 1 fine-tuned model"):
        merging.merge(BASE, FTS, "slerp")
    with pytest.raises(WeightlabError, match="expected one weight or one per task"):
        merging.merge(BASE, FTS, "task-arithmetic", weights=(1.0, 2.0, 3.0))
    with pytest.raises(WeightlabError, match="sum of the weights, which is 0"):
        merging.merge(BASE, FTS, "linear", weights=(1.0, -1.0))
