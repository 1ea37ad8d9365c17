"""Replica mean-field theory of the teacher–student binary perceptron (``variational-binary-cl``): known answers
of the quadratures and of the saddle points, on small grids."""

from __future__ import annotations

import math

import pytest
import torch

from weightlab.errors import WeightlabError
from weightlab.methods.binary_cl.mean_field import (
    MeanFieldConfig,
    binary_kl,
    first_task,
    m_grid,
    normal_grid,
    second_task,
    site_averages,
)

SMALL = MeanFieldConfig(n_z=101, n_x=41, n_m=41, max_iter=100, tol=1e-5)


def test_normal_grid_integrates_the_moments_of_a_standard_normal() -> None:
    z, log_w = normal_grid(401)
    w = torch.exp(log_w)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w @ z) == pytest.approx(0.0, abs=1e-12)
    assert float(w @ z**2) == pytest.approx(1.0, rel=1e-6)
    assert float(w @ z**4) == pytest.approx(3.0, rel=1e-5)


def test_m_grid_integrates_over_minus_one_to_one() -> None:
    m, log_w, log_up, log_down = m_grid(121)
    w = torch.exp(log_w)
    assert float(w.sum()) == pytest.approx(2.0, rel=1e-6)  # ∫_{-1}^{1} dm
    assert float(w @ m**2) == pytest.approx(2 / 3, rel=1e-6)
    torch.testing.assert_close(torch.exp(log_up), 1 + m)
    torch.testing.assert_close(torch.exp(log_down), 1 - m)


@pytest.mark.parametrize("h", [0.5, 2.0, 7.0])
def test_site_average_without_quadratic_term_is_the_langevin_function(h: float) -> None:
    mean, second, _ = site_averages(0.0, torch.tensor([h, 0.0], dtype=torch.float64), n_m=201)
    assert float(mean[0]) == pytest.approx(1 / math.tanh(h) - 1 / h, rel=1e-6)
    assert float(second[1]) == pytest.approx(1 / 3, rel=1e-6)


def test_binary_kl_vanishes_at_the_reference_and_is_positive_elsewhere() -> None:
    _, _, up, down = m_grid(41)
    kl = binary_kl(up[None, :], down[None, :], up[:, None], down[:, None])  # (ref, m)
    assert torch.allclose(kl.diagonal(), torch.zeros(41, dtype=torch.float64), atol=1e-12)
    assert bool((kl + 1e-12 >= 0).all())
    p, q = 0.5 * (1 + 0.6), 0.5 * (1 - 0.2)  # m = 0.6 against m_ref = −0.2
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    val = binary_kl(torch.log(torch.tensor(1.6)), torch.log(torch.tensor(0.4)), torch.log(torch.tensor(0.8)),
                    torch.log(torch.tensor(1.2)))
    assert float(val) == pytest.approx(expected, rel=1e-6)


def test_without_data_the_student_is_the_flat_measure() -> None:
    fp = first_task(0.0, SMALL)
    assert fp.converged and fp.r == pytest.approx(0.0, abs=1e-6) and fp.q_star == pytest.approx(1 / 3, rel=1e-4)


def test_saddle_points_learn_and_the_prior_trades_teacher_two_for_teacher_one() -> None:
    """More data → more overlap; γ = 0 decouples the tasks (R1 = r₀·R2, R2 = task 1's R at the same α);
    the prior (γ = 1) keeps more overlap with teacher 1 and less with teacher 2."""
    low, high = first_task(0.3, SMALL), first_task(0.8, SMALL)
    assert low.converged and high.converged and 0 < low.r < high.r < 1
    free = second_task(high, 0.8, teacher_overlap=0.5, gamma=0.0, config=SMALL)
    tied = second_task(high, 0.8, teacher_overlap=0.5, gamma=1.0, config=SMALL)
    assert free.converged and tied.converged
    assert free.r == pytest.approx(high.r, abs=2e-3)
    assert free.r_other == pytest.approx(0.5 * free.r, abs=2e-3)
    assert tied.r_other > free.r_other and tied.r < free.r


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(WeightlabError, match="mean-field beta must be > 0, got 0"):
        MeanFieldConfig(beta=0.0)
    with pytest.raises(WeightlabError, match="alpha must be ≥ 0, got -1"):
        first_task(-1.0, SMALL)
    with pytest.raises(WeightlabError, match="teacher_overlap in"):
        second_task(first_task(0.0, SMALL), 1.0, teacher_overlap=2.0, gamma=1.0, config=SMALL)
