"""Exact Bayesian mixture: known answers, the chain rule, and the classic regret bound (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.methods.universality.mixture import (
    BayesMixture,
    StreamingMixture,
    cumulative_log_marginal,
    normalize_log_weights,
    regret,
    uniform_log_prior,
)


def bernoulli_lik(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(H,) success probabilities, (n,) bits -> (n, H)`` log-likelihoods."""
    return torch.where(y[:, None] == 1, p[None, :].log(), (1 - p[None, :]).log()).double()


def test_one_hypothesis_that_is_the_truth_has_zero_regret() -> None:
    lik = torch.randn(50, 1, dtype=torch.float64).clamp(max=0) - 0.1
    r = regret(lik, torch.zeros(1, dtype=torch.float64), reference=0)
    assert torch.equal(r, torch.zeros(50, dtype=torch.float64))


def test_two_coins_known_answer() -> None:
    # coins p = 1/2 and p = 1 with prior 1/2 each; after seeing "1, 1": q(11) = ½·¼ + ½·1 = 5/8
    lik = bernoulli_lik(torch.tensor([0.5, 1.0]), torch.tensor([1, 1]))
    log_q = cumulative_log_marginal(lik, torch.log(torch.tensor([0.5, 0.5])))
    assert torch.allclose(log_q, torch.tensor([math.log(0.75), math.log(5 / 8)], dtype=torch.float64))
    # regret against the fair coin: log(1/4) − log(5/8) < 0 (the mixture beat it)
    assert regret(lik, torch.zeros(2), reference=0)[-1].item() == pytest.approx(math.log(0.25 / (5 / 8)))
    # and against the sure coin: log 1 − log 5/8 = log 8/5 ≤ log 1/prior = log 2
    assert regret(lik, torch.zeros(2), reference=1)[-1].item() == pytest.approx(math.log(8 / 5))


def test_sequential_updates_equal_the_joint_marginal_chain_rule() -> None:
    g = torch.Generator().manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(30, 7, 3, generator=g, dtype=torch.float64), -1)  # (n, H, C)
    y = torch.randint(3, (30,), generator=g)
    prior = torch.randn(7, generator=g, dtype=torch.float64)
    mixture = BayesMixture(prior)
    losses = torch.tensor([mixture.update(log_probs[t], int(y[t])) for t in range(30)], dtype=torch.float64)
    lik = log_probs.gather(-1, y[:, None, None].expand(-1, 7, 1)).squeeze(-1)  # (n, H)
    assert torch.allclose(-torch.cumsum(losses, 0), cumulative_log_marginal(lik, prior), atol=1e-10)
    assert mixture.cumulative_loss == pytest.approx(float(losses.sum()))
    # posterior is prior × likelihood, normalized
    assert torch.allclose(mixture.log_posterior, normalize_log_weights(prior + lik.sum(0)), atol=1e-10)


def test_streaming_chunks_equal_the_whole_class() -> None:
    g = torch.Generator().manual_seed(2)
    lik = -torch.rand(20, 11, generator=g, dtype=torch.float64) * 2
    prior = torch.randn(11, generator=g, dtype=torch.float64)
    stream = StreamingMixture()
    for lo, hi in ((0, 3), (3, 4), (4, 11)):
        stream.add(lik[:, lo:hi], prior[lo:hi])
    assert torch.allclose(stream.log_marginal, cumulative_log_marginal(lik, prior), atol=1e-12)


def test_log_space_survives_long_sequences() -> None:
    lik = torch.full((5000, 2), -3.0, dtype=torch.float64)
    lik[:, 1] = -3.5
    log_q = cumulative_log_marginal(lik, torch.zeros(2))
    assert torch.isfinite(log_q).all()
    assert regret(lik, torch.zeros(2), reference=0)[-1].item() == pytest.approx(math.log(2), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12),
    n=st.integers(1, 40),
    truth=st.integers(0, 11),
    seed=st.integers(0, 2**31 - 1),
    peaked=st.booleans(),
)
def test_regret_never_exceeds_log_inverse_prior_of_truth(
    h: int, n: int, truth: int, seed: int, peaked: bool
) -> None:
    truth = truth % h
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(h, generator=g, dtype=torch.float64).clamp(0.01, 0.99)  # Bernoulli hypotheses
    y = torch.bernoulli(p[truth].expand(n), generator=g).long()
    log_prior = torch.randn(h, generator=g, dtype=torch.float64) * (4.0 if peaked else 1.0)
    lik = bernoulli_lik(p, y)
    r = regret(lik, log_prior, reference=truth)
    bound = -normalize_log_weights(log_prior)[truth]
    assert (r <= bound + 1e-9).all()


def test_uniform_prior_gives_log_size_bound_tight_when_all_others_are_impossible() -> None:
    # hypotheses that put zero mass on the observed label drop out; the truth keeps it: regret = log H exactly
    h = 5
    lik = torch.full((4, h), -math.inf, dtype=torch.float64)
    lik[:, 2] = 0.0
    r = regret(lik, uniform_log_prior(h), reference=2)
    assert r[-1].item() == pytest.approx(math.log(h))


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(WeightlabError, match="size 0"):
        uniform_log_prior(0)
    with pytest.raises(WeightlabError, match=r"shape \(n, H\) with H = 3"):
        cumulative_log_marginal(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(WeightlabError, match="reference index 7"):
        regret(torch.zeros(4, 3), torch.zeros(3), reference=7)
    with pytest.raises(WeightlabError, match="total mass"):
        normalize_log_weights(torch.full((3,), -math.inf))
    with pytest.raises(WeightlabError, match="label 5"):
        BayesMixture(torch.zeros(2)).update(torch.zeros(2, 3), 5)
    with pytest.raises(WeightlabError, match="no hypotheses yet"):
        _ = StreamingMixture().log_marginal
