"""Weight of the hypothesis: divergences, enumerated / MC / Laplace weights, the resolvability bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.methods.universality.hypothesis_weight import (
    expected_divergence,
    fisher_information,
    laplace_log_inv_weight,
    log_weight,
    resolvability_bound,
    unit_ball_log_volume,
)
from weightlab.methods.universality.mixture import cumulative_log_marginal, regret
from weightlab.methods.universality.teacher_student import SignNetClass, bernoulli_log_probs, tanh_unit_log_probs


def test_expected_divergence_known_answer() -> None:
    # Bernoulli(1/2) vs Bernoulli(1/4): KL = ½ log(½/¼) + ½ log(½/¾) = ½ log(4/3)
    true = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64))
    hyp = torch.log(
        torch.tensor([[[0.75, 0.25], [0.75, 0.25]], [[0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64)
    )
    assert torch.allclose(
        expected_divergence(true, hyp), torch.tensor([0.5 * math.log(4 / 3), 0.0], dtype=torch.float64)
    )


def test_log_weight_enumerated_and_monte_carlo() -> None:
    div = torch.tensor([0.0, 0.1, 0.5, 2.0], dtype=torch.float64)
    prior = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    eps = torch.tensor([0.0, 0.2, 1.0, 5.0], dtype=torch.float64)
    assert torch.allclose(
        log_weight(div, eps, log_prior=prior).exp(), torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    )
    assert torch.allclose(
        log_weight(div, eps).exp(), torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    assert log_weight(div, torch.tensor([-1.0])).item() == -math.inf


def test_unit_ball_volumes() -> None:
    assert math.exp(unit_ball_log_volume(1)) == pytest.approx(2.0)
    assert math.exp(unit_ball_log_volume(2)) == pytest.approx(math.pi)
    assert math.exp(unit_ball_log_volume(3)) == pytest.approx(4 * math.pi / 3)
    assert unit_ball_log_volume(0) == 0.0


def test_laplace_weight_matches_the_exact_ellipsoid_mass() -> None:
    # quadratic divergence ½ δᵀFδ with a flat prior density w: W(A_ε) = w · V_2 (2ε)^{d/2} / sqrt(det F)
    fisher = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    eps = torch.tensor([0.01, 0.1], dtype=torch.float64)
    inv_w, d = laplace_log_inv_weight(fisher, eps, log_prior_density=math.log(0.05))
    assert d == 2
    exact = 0.05 * math.pi * (2 * eps) / math.sqrt(7.0)
    assert torch.allclose(inv_w, -exact.log())
    # a flat direction costs nothing: the same estimate as the 1-D stiff part alone
    flat = torch.diag(torch.tensor([3.0, 0.0], dtype=torch.float64))
    inv_flat, d_flat = laplace_log_inv_weight(flat, eps, log_prior_density=0.0)
    assert d_flat == 1
    assert torch.allclose(inv_flat, -torch.log(2 * torch.sqrt(2 * eps / 3.0)))


def test_laplace_agrees_with_monte_carlo_for_a_gaussian_location_family() -> None:
    # p_θ = N(θ, I) in 2-D: KL(p_0 ‖ p_θ) = |θ|²/2 (F = I); prior N(0, 4 I); truth θ* = 0
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(400_000, 2, generator=g, dtype=torch.float64) * 2.0
    eps = torch.tensor([0.02, 0.05], dtype=torch.float64)
    mc = -log_weight((draws**2).sum(1) / 2, eps)
    laplace, _ = laplace_log_inv_weight(
        torch.eye(2, dtype=torch.float64), eps, log_prior_density=-math.log(2 * math.pi * 4)
    )
    assert torch.allclose(mc, laplace, atol=0.06)


def test_fisher_of_logistic_regression() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    theta = torch.tensor([0.5, -0.25], dtype=torch.float64)
    fisher = fisher_information(lambda th: bernoulli_log_probs(x @ th), theta)
    p = torch.sigmoid(x @ theta)
    expected = (x.T * (p * (1 - p))) @ x / 3
    assert torch.allclose(fisher, expected)


def test_resolvability_bound_known_answer() -> None:
    eps = torch.tensor([0.0, 0.1, 1.0])
    inv_w = torch.tensor([math.inf, 2.0, 0.5])
    bound, best = resolvability_bound(torch.tensor([1, 10, 100]), eps, inv_w)
    assert torch.allclose(bound, torch.tensor([1.5, 3.0, 12.0], dtype=torch.float64))
    assert best.tolist() == pytest.approx([1.0, 0.1, 0.1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), hidden=st.integers(1, 2))
def test_sign_class_regret_never_exceeds_log_inverse_weight_of_the_teacher_function(
    seed: int, hidden: int
) -> None:
    # every member computing the teacher's function has its likelihood on every sequence: R_n ≤ log 1/W(A_0)
    cls = SignNetClass(2, hidden, beta=1.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    teacher = cls.hypothesis_index([(1.0, (1.0, -1.0))])
    logits = torch.cat(list(cls.logit_chunks(x)))  # (H, n)
    y = torch.bernoulli(torch.sigmoid(logits[teacher]), generator=g).long()
    lik = bernoulli_log_probs(logits).gather(-1, y.expand(logits.shape[0], -1)[..., None]).squeeze(-1).T
    r = regret(lik, torch.zeros(cls.size, dtype=torch.float64), reference=teacher)
    same = (logits == logits[teacher]).all(1)
    log_inv_w0 = math.log(cls.size / int(same.sum()))
    assert (r <= log_inv_w0 + 1e-9).all()
    assert log_inv_w0 < cls.log_size or hidden == 1 and log_inv_w0 <= cls.log_size


def test_sign_class_indexing_and_tanh_model() -> None:
    cls = SignNetClass(3, 2)
    assert cls.size == 81**2
    x = torch.randn(10, 3, dtype=torch.float64)
    units = [(1.0, (1.0, -1.0, 0.0)), (-1.0, (0.0, 1.0, 1.0))]
    h = cls.hypothesis_index(units)
    chunks = torch.cat(list(cls.logit_chunks(x)))
    assert torch.equal(chunks[h], cls.logits(units, x))
    assert torch.equal(
        cls.logits(units, x), 2.0 * (torch.sign(x[:, 0] - x[:, 1]) - torch.sign(x[:, 1] + x[:, 2]))
    )
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    lp = tanh_unit_log_probs(theta, x[:, :2])
    assert torch.allclose(lp[:, 1].exp(), torch.sigmoid(2.0 * torch.tanh(x[:, :2] @ theta[:2])))


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(WeightlabError, match="square"):
        laplace_log_inv_weight(torch.zeros(2, 3), torch.tensor([0.1]), log_prior_density=0.0)
    with pytest.raises(WeightlabError, match="eps must be > 0"):
        laplace_log_inv_weight(torch.eye(2), torch.tensor([0.0]), log_prior_density=0.0)
    with pytest.raises(WeightlabError, match="every log 1/W"):
        resolvability_bound(torch.tensor([1]), torch.tensor([0.1]), torch.tensor([math.inf]))
    with pytest.raises(WeightlabError, match="non-empty"):
        log_weight(torch.zeros(0), torch.tensor([0.1]))
    with pytest.raises(WeightlabError, match="not in the grid"):
        SignNetClass(2, 1).unit_index(2.0, [0.0, 1.0])
    with pytest.raises(WeightlabError, match="do not fit"):
        SignNetClass(2, 1).hypothesis_index([(1.0, (1.0, 0.0)), (1.0, (0.0, 1.0))])


def test_grouped_enumeration_gives_the_same_mixture_and_weight_as_the_raw_class() -> None:
    cls = SignNetClass(2, 2, beta=1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.randint(2, (30,), generator=g)
    sign = 2.0 * y.double() - 1.0
    raw = torch.cat(list(cls.logit_chunks(x)))  # (81, n)
    grouped = list(cls.grouped_logit_chunks(x, chunk=7))
    logits, log_prior = torch.cat([c for c, _ in grouped]), torch.cat([lp for _, lp in grouped])
    assert logits.shape[0] == 45 and torch.logsumexp(log_prior, 0).item() == pytest.approx(0.0, abs=1e-12)
    raw_q = cumulative_log_marginal(
        F.logsigmoid(sign * raw).T, torch.zeros(raw.shape[0], dtype=torch.float64)
    )
    grouped_q = cumulative_log_marginal(F.logsigmoid(sign * logits).T, log_prior)
    assert torch.allclose(raw_q, grouped_q, atol=1e-12)
    teacher = bernoulli_log_probs(cls.logits([(1.0, (1.0, -1.0))], x))
    eps = torch.tensor([0.0, 0.05, 0.5], dtype=torch.float64)
    w_raw = log_weight(expected_divergence(teacher, bernoulli_log_probs(raw)), eps)
    w_grouped = log_weight(
        expected_divergence(teacher, bernoulli_log_probs(logits)), eps, log_prior=log_prior
    )
    assert torch.allclose(w_raw, w_grouped, atol=1e-12)
