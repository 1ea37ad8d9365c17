"""Mask selection for LIFT (weights/lowrank.py): known answers on hand-made matrices and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.weights.lowrank import (
    carry_over,
    density_budget,
    gradient_mask,
    indices_to_mask,
    lora_budget,
    low_rank_approximation,
    magnitude_mask,
    mask_overlap,
    principal_weight_mask,
    random_mask,
)

S5 = math.sqrt(5)


def two_component() -> torch.Tensor:
    """W = 10·u1 v1ᵀ + 6·u2 v2ᵀ with u1 = (2, 1)/√5, u2 = (−1, 2)/√5, v1 = e1, v2 = e2 (an exact SVD):
    W = [[20, −6], [10, 12]]/√5 ≈ [[8.94, −2.68], [4.47, 5.37]]; its rank-1 part is
    [[8.94, 0], [4.47, 0]]."""
    return torch.tensor([[20.0, -6.0], [10.0, 12.0]]) / S5


def test_budgets_follow_the_lora_formula() -> None:
    assert lora_budget((4096, 4096), 128) == 8192 * 128  # 6.25 % of a LLaMA q/k/v/o matrix
    assert lora_budget((4096, 11008), 128) == (4096 + 11008) * 128
    assert lora_budget((3, 4), 5) == 12  # capped at m·n
    assert density_budget((10, 10), 0.05) == 5
    assert density_budget((10, 10), 0.001) == 1


def test_low_rank_approximation_known_answer() -> None:
    approx = low_rank_approximation(two_component(), 1)
    assert torch.allclose(approx, torch.tensor([[20.0, 0.0], [10.0, 0.0]]) / S5, atol=1e-5)
    assert torch.allclose(low_rank_approximation(two_component(), 2), two_component(), atol=1e-5)


def test_principal_mask_differs_from_magnitude_where_the_low_rank_part_does() -> None:
    w = two_component()
    # |W| ranks (0,0) 8.94 > (1,1) 5.37 > (1,0) 4.47 > (0,1) 2.68; |W_1| ranks (0,0) 8.94 > (1,0) 4.47 > zeros
    assert magnitude_mask(w, 2).tolist() == [0, 3]
    assert principal_weight_mask(w, 1, 2).tolist() == [0, 2]
    # the released configs' "lift_sparse" keeps the smallest |W_1| (the two zeros of the second column)
    assert principal_weight_mask(w, 1, 2, largest=False).tolist() == [1, 3]
    assert principal_weight_mask(w, 2, 2).tolist() == [0, 3]  # full rank: back to magnitude


def test_rank_one_matrix_principal_equals_magnitude_and_randomized_equals_exact() -> None:
    w = torch.outer(torch.tensor([3.0, 1.0, -2.0]), torch.tensor([2.0, 1.0, 0.5, -4.0]))  # (3, 4), rank 1
    # |W| = [[6, 3, 1.5, 12], [2, 1, 0.5, 4], [4, 2, 1, 8]]: the top three are 12, 8, 6
    assert magnitude_mask(w, 3).tolist() == [0, 3, 11]
    assert principal_weight_mask(w, 1, 3).tolist() == [0, 3, 11]
    torch.manual_seed(0)
    assert principal_weight_mask(w, 1, 3, randomized=True).tolist() == [0, 3, 11]

def test_gradient_and_random_masks() -> None:
    g = torch.tensor([[0.1, -5.0], [2.0, 0.0]])
    assert gradient_mask(g, 2).tolist() == [1, 2]
    a = random_mask((10, 10), 7, generator=torch.Generator().manual_seed(3))
    b = random_mask((10, 10), 7, generator=torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 7 and a.tolist() == sorted(a.tolist())
    assert indices_to_mask(torch.tensor([0, 3]), (2, 2)).tolist() == [[True, False], [False, True]]


def test_carry_over_keeps_the_values_of_entries_that_stay() -> None:
    old = torch.tensor([1, 4, 7], dtype=torch.int32)
    new = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
    out = carry_over(old, new, torch.tensor([10.0, 20.0, 30.0]))
    assert out.tolist() == [0.0, 20.0, 30.0, 0.0]
    assert mask_overlap(old, new) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: principal_weight_mask(torch.ones(3, 4), 4, 2), r"rank 4 is not in \[1, min\(m, n\)\] = \[1, 3"),
    (lambda: principal_weight_mask(torch.ones(3, 4), 1, 13), "k = 13 entries is not in \\[1, 12\\]"),
    (lambda: magnitude_mask(torch.ones(3, 4), 0), "k = 0 entries"),
    (lambda: low_rank_approximation(torch.ones(2, 3, 4), 1), "expected a 2-D weight matrix"),
    (lambda: lora_budget((3, 4), 0), "lora_rank must be ≥ 1"),
    (lambda: density_budget((3, 4), 1.5), "density must be in \\(0, 1\\]"),
])
def test_bad_input_is_named(call, message: str) -> None:
    with pytest.raises(WeightlabError, match=message):
        call()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), r=st.integers(1, 3), frac=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**16))
def test_masks_are_sorted_unique_and_sized(m: int, n: int, r: int, frac: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    k = max(1, int(frac * m * n))
    r = min(r, m, n)
    for idx in (principal_weight_mask(w, r, k), magnitude_mask(w, k), random_mask((m, n), k, generator=g)):
        vals = idx.tolist()
        assert len(vals) == k == len(set(vals)) and vals == sorted(vals) and 0 <= vals[0] and vals[-1] < m * n


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 10), n=st.integers(2, 10), r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_principal_weights_of_a_rank_r_matrix_are_its_largest(m: int, n: int, r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r = min(r, m, n)
    w = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)  # rank ≤ r: W_r = W
    k = max(1, m * n // 3)
    chosen = w.abs().view(-1)[principal_weight_mask(w, r, k)].sum()
    best = w.abs().view(-1)[magnitude_mask(w, k)].sum()
    assert chosen == pytest.approx(best.item(), rel=1e-4)
