"""SGLD: step-size formulas, the update by hand, a Gaussian posterior, batched = sequential chains."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.universality.sgld import (
    SGLD,
    CollectConfig,
    CollectSamples,
    SGLDConfig,
    cyclical_step_size,
    polynomial_step_size,
)
from weightlab.methods.universality.sgld_chains import StackedMLP, chain_log_probs, chain_nll, ensemble_log_proba
from weightlab.train import TrainConfig, train


def test_polynomial_step_size_formula() -> None:
    assert polynomial_step_size(0, a=0.1, b=1.0, gamma=0.55) == pytest.approx(0.1)
    assert polynomial_step_size(9, a=0.1, b=1.0, gamma=1.0) == pytest.approx(0.01)
    assert polynomial_step_size(3, a=2.0, b=5.0, gamma=0.5) == pytest.approx(2.0 / math.sqrt(8))
    assert polynomial_step_size(123, a=0.3, b=7.0, gamma=0.0) == pytest.approx(0.3)


def test_cyclical_step_size_formula() -> None:
    # total 100, 4 cycles of 25: peak a at each cycle start, a/2 at the middle
    assert cyclical_step_size(0, a=0.2, total_steps=100, cycles=4) == pytest.approx(0.2)
    assert cyclical_step_size(25, a=0.2, total_steps=100, cycles=4) == pytest.approx(0.2)
    assert cyclical_step_size(12.5, a=0.2, total_steps=100, cycles=4) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert cyclical_step_size(24, a=0.2, total_steps=100, cycles=4) == pytest.approx(
        0.1 * (math.cos(math.pi * 24 / 25) + 1)
    )


def test_optimizer_schedule_and_sampling_stage() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = SGLD(
        [p],
        SGLDConfig(num_data=1, lr=0.4, schedule="cyclical", total_steps=8, cycles=2, explore_fraction=0.5),
    )
    assert [opt.step_size(t) for t in (0, 2, 4)] == pytest.approx([0.4, 0.2, 0.4])
    assert [opt.is_sampling(t) for t in range(8)] == [False, False, True, True] * 2
    opt2 = SGLD([p], SGLDConfig(num_data=1, lr=0.4, b=2.0, gamma=1.0))
    assert opt2.step_size(6) == pytest.approx(0.05)


def test_one_step_by_hand_plain_and_preconditioned() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, 0.25])  # mean-NLL gradient
    xi = torch.tensor([1.0, -1.0])
    opt = SGLD([p], SGLDConfig(num_data=4, prior_std=2.0, lr=0.1, b=1.0, gamma=0.0, temperature=0.5))
    opt.step(noise=[xi])
    grad_u = 4 * torch.tensor([0.5, 0.25]) + torch.tensor([1.0, -2.0]) / 4  # N ḡ + θ/σ²
    expected = torch.tensor([1.0, -2.0]) - 0.05 * grad_u + math.sqrt(0.1 * 0.5) * xi
    assert torch.allclose(p.detach(), expected)

    q = nn.Parameter(torch.tensor([1.0, -2.0]))
    q.grad = torch.tensor([0.5, 0.25])
    opt = SGLD(
        [q], SGLDConfig(num_data=4, prior_std=None, lr=0.1, gamma=0.0, precondition=True, alpha=0.9, eps=1e-3)
    )
    opt.step(noise=[xi])
    v = 0.1 * torch.tensor([0.25, 0.0625])
    g = 1 / (1e-3 + v.sqrt())
    expected = torch.tensor([1.0, -2.0]) - 0.05 * g * 4 * torch.tensor([0.5, 0.25]) + (0.1 * g).sqrt() * xi
    assert torch.allclose(q.detach(), expected)


def test_state_dict_keeps_the_step_count_and_preconditioner() -> None:
    p = nn.Parameter(torch.ones(3))
    config = SGLDConfig(num_data=5, lr=0.1, b=1.0, gamma=1.0, precondition=True)
    opt = SGLD([p], config)
    for _ in range(3):
        p.grad = torch.tensor([0.1, 0.2, 0.3])
        opt.step(noise=[torch.zeros(3)])
    again = SGLD([p], config)
    again.load_state_dict(opt.state_dict())
    assert again.steps == 3 and again.step_size() == pytest.approx(0.1 / 4)
    assert torch.equal(again.state[p]["square_avg"], opt.state[p]["square_avg"])


def test_temperature_zero_is_gradient_descent_on_the_potential() -> None:
    p = nn.Parameter(torch.tensor([3.0]))
    opt = SGLD([p], SGLDConfig(num_data=10, prior_std=1.0, lr=0.01, gamma=0.0, temperature=0.0))
    p.grad = torch.tensor([0.2])
    opt.step()
    assert p.item() == pytest.approx(3.0 - 0.005 * (10 * 0.2 + 3.0))


def test_samples_a_gaussian_posterior() -> None:
    # mean NLL ½(θ−m)² with N = 20 and prior N(0, 1): posterior N(20m/21, 1/21). 4,000 independent chains
    # (elements of one tensor) after 400 steps must match its mean and variance.
    torch.manual_seed(0)
    m, n = 1.0, 20
    theta = nn.Parameter(torch.zeros(4000, dtype=torch.float64))
    opt = SGLD(
        [theta],
        SGLDConfig(num_data=n, prior_std=1.0, lr=0.01, gamma=0.0),
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(400):
        theta.grad = theta.detach() - m
        opt.step()
    mean, var = theta.mean().item(), theta.var().item()
    assert mean == pytest.approx(n * m / 21, abs=0.02)
    # the Euler step inflates the variance by 1/(1 − η·21/4) ≈ 5.5% at η = 0.01
    assert var == pytest.approx(1 / 21 / (1 - 0.01 * 21 / 4), rel=0.08)


def test_batched_chains_equal_sequential_chains_given_the_same_noise() -> None:
    torch.manual_seed(0)
    k, steps = 4, 6
    chains = StackedMLP(k, (5, 7, 3), activation="tanh", generator=torch.Generator().manual_seed(1)).double()
    singles = [chains.chain(i).double() for i in range(k)]
    x, y = torch.randn(steps, 8, 5, dtype=torch.float64), torch.randint(3, (steps, 8))
    config = SGLDConfig(num_data=100, prior_std=1.0, lr=1e-3, precondition=True)
    noise = [
        [torch.randn(steps, *p.shape, dtype=torch.float64) for p in chains.parameters()]
    ]  # per stacked param: (T, K, ...)
    opt = SGLD(chains.parameters(), config)
    seq_opts = [SGLD(s.parameters(), config) for s in singles]
    order = [0, 2, 1, 3]  # nn.Sequential order: w0, b0, w1, b1; stacked order: w0, w1, b0, b1
    for t in range(steps):
        opt.zero_grad()
        chain_nll(chains(x[t]), y[t]).mean().backward()
        opt.step(noise=[z[t] for z in noise[0]])
        for i, (single, sopt) in enumerate(zip(singles, seq_opts, strict=True)):
            sopt.zero_grad()
            nn.functional.cross_entropy(single(x[t]), y[t]).backward()
            # Linear weights are (out, in) = stacked (in, out) transposed; biases (out,) = stacked (1, out)
            mine = [noise[0][j][t][i] for j in order]
            sopt.step(noise=[mine[0].T, mine[1].reshape(-1), mine[2].T, mine[3].reshape(-1)])
    for i, single in enumerate(singles):
        moved = [p for p in single.parameters()]
        assert torch.allclose(chains.weights[0][i].T, moved[0], atol=1e-10, rtol=0)
        assert torch.allclose(chains.biases[1][i, 0], moved[3], atol=1e-10, rtol=0)
        assert torch.allclose(chains(x[0])[i], single(x[0]), atol=1e-10, rtol=0)
    assert not torch.allclose(chains.weights[0][0], chains.weights[0][1])  # the chains did differ


def test_stacked_mlp_roundtrips_and_uses_the_one_loop() -> None:
    chains = StackedMLP(3, (4, 6, 1), generator=torch.Generator().manual_seed(0))
    copy = StackedMLP(3, (4, 6, 1)).load_chains([chains.chain(i) for i in range(3)])
    assert torch.equal(copy.flat_parameters(), chains.flat_parameters())
    flat = torch.randn(3, chains.flat_parameters().shape[1])
    copy.set_flat_parameters(flat)
    assert torch.equal(copy.flat_parameters(), flat)
    data = ArrayDataset(torch.randn(40, 4), (torch.randn(40) > 0).long())
    opt = SGLD(
        chains.parameters(), SGLDConfig(num_data=40, lr=1e-3, schedule="cyclical", total_steps=20, cycles=2)
    )
    collect = CollectSamples(CollectConfig(every=1, burn_in=0))
    train(
        chains,
        data,
        TrainConfig(max_steps=20, batch_size=10, device="cpu"),
        optimizer=opt,
        loss_fn=chain_nll,
        callbacks=[collect],
    )
    assert opt.steps == 20 and len(collect.samples) == 10  # sampling stage only: half of each cycle
    log_q = ensemble_log_proba(chain_log_probs(chains(data.x)))
    assert log_q.shape == (40, 2) and torch.allclose(log_q.exp().sum(-1), torch.ones(40))


def test_ensemble_of_identical_members_is_that_member() -> None:
    lp = torch.log_softmax(torch.randn(1, 5, 3), -1)
    assert torch.allclose(ensemble_log_proba(lp.expand(4, -1, -1)), lp[0], atol=1e-6)
    two = torch.log(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert torch.allclose(ensemble_log_proba(two).exp(), torch.tensor([[0.5, 0.5]]))


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(WeightlabError, match="gamma must lie in"):
        SGLDConfig(num_data=1, gamma=1.5)
    with pytest.raises(WeightlabError, match="total_steps"):
        SGLDConfig(num_data=1, schedule="cyclical")
    with pytest.raises(WeightlabError, match="num_data"):
        SGLDConfig(num_data=0)
    with pytest.raises(WeightlabError, match="temperature"):
        SGLDConfig(num_data=1, temperature=-1)
    with pytest.raises(WeightlabError, match="activation"):
        StackedMLP(2, (3, 1), activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(WeightlabError, match="chain index 5"):
        StackedMLP(2, (3, 1)).chain(5)
    with pytest.raises(WeightlabError, match="every must be"):
        CollectConfig(every=0)
