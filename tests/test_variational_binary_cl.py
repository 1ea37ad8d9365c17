"""Variational binary layers, the field-space update, metaplasticity and EWC (known answers, properties),
and their end-to-end directions at tiny scale."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from weightlab.data import ArrayDataset, Experience, digits, domain_incremental
from weightlab.errors import WeightlabError
from weightlab.methods.binary_cl.metaplasticity import (
    BinaryLinear,
    BinaryMLP,
    MetaplasticAdam,
    MetaplasticityConfig,
    meta_factor,
    sign_ste,
)
from weightlab.methods.binary_cl.variational import (
    BetaAnnealing,
    ProbitPerceptron,
    VariationalBinaryLinear,
    VariationalBinaryMLP,
    VariationalConfig,
    VariationalFieldAdam,
    annealed_beta,
    binary_kl,
    binary_layers,
    binary_teacher,
    field_moments,
    forward_mode,
    generalization_error,
    overlaps,
    related_teacher,
    sample_binary,
    set_beta,
    teacher_data,
)
from weightlab.methods.continual.ewc import EWC, EWCConfig, diagonal_fisher, ewc_penalty
from weightlab.train import TrainConfig, accuracy, train


def test_field_moments_known_answer() -> None:
    mean, var = field_moments(torch.tensor([0.0, 0.5, -1.0]), 2.0)
    expected = torch.tanh(torch.tensor([0.0, 1.0, -2.0]))
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(var, 1 - expected**2)
    assert var[0] == 1.0  # θ = 0: a fair coin has variance 1


@settings(max_examples=40, deadline=None)
@given(theta=st.floats(-5, 5), beta=st.floats(0.01, 20))
def test_variance_is_one_over_cosh_squared(theta: float, beta: float) -> None:
    mean, var = field_moments(torch.tensor([theta], dtype=torch.float64), beta)
    assert 0.0 <= var.item() <= 1.0
    assert var.item() == pytest.approx(1 / math.cosh(beta * theta) ** 2, abs=1e-12)
    assert mean.item() ** 2 + var.item() == pytest.approx(1.0)


def test_large_beta_makes_weights_deterministic() -> None:
    layer = VariationalBinaryLinear(6, 3, beta=1e4)
    a = torch.rand(5, 6)
    signs = torch.sign(layer.field.detach())
    expected = a @ signs.T / math.sqrt(6)
    s1, s2 = sample_binary(layer.field, 1e4), sample_binary(layer.field, 1e4)
    assert torch.equal(s1, signs) and torch.equal(s2, signs)
    with torch.no_grad():
        torch.testing.assert_close(layer(a), expected)  # mean-field noise vanishes: σ² = 0
        with forward_mode(layer, "sample"):
            torch.testing.assert_close(layer(a), expected)
    assert layer.mode == "meanfield"  # restored


def test_sampling_frequency_matches_the_mean() -> None:
    field = torch.full((20000,), 0.3)
    gen = torch.Generator().manual_seed(0)
    w = sample_binary(field, 2.0, generator=gen)
    assert w.mean().item() == pytest.approx(math.tanh(0.6), abs=0.02)


def test_autograd_gives_the_paper_field_update() -> None:
    """dL/dθ_ij = Σ_b K_bi (β a_bj/√N − β ε_bi a_bj² m_ij / (N v_bi)) σ²_ij (mean-field preactivation)."""
    torch.manual_seed(1)
    n_in, n_out, beta = 5, 3, 1.7
    layer = VariationalBinaryLinear(n_in, n_out, beta=beta)
    a, K = torch.rand(4, n_in, dtype=torch.float64), torch.randn(4, n_out, dtype=torch.float64)
    layer.double()
    torch.manual_seed(7)
    z = layer(a)
    (K * z).sum().backward()
    torch.manual_seed(7)
    eps = torch.randn_like(z)  # the same ε the forward drew
    m, var = field_moments(layer.field.detach(), beta)
    v = torch.sqrt((a * a) @ var.T / n_in + 1e-30)
    expected = (K.T @ a) * beta / math.sqrt(n_in) - beta * ((K * eps / v).T @ (a * a)) * m / n_in
    torch.testing.assert_close(layer.field.grad, expected * var)


def test_kl_gradient_is_beta_squared_sigma_squared_times_displacement() -> None:
    theta = torch.tensor([0.3, -0.8, 1.2], dtype=torch.float64, requires_grad=True)
    prior = torch.tensor([0.1, 0.2, 1.2], dtype=torch.float64)
    beta = 2.5
    binary_kl(theta, prior, beta).backward()
    _, var = field_moments(theta.detach(), beta)
    torch.testing.assert_close(theta.grad, beta**2 * var * (theta.detach() - prior))
    assert binary_kl(prior, prior, beta).item() == pytest.approx(0.0, abs=1e-12)


def test_optimizer_adds_the_kl_term_for_both_priors() -> None:
    layer = VariationalBinaryLinear(3, 2, beta=2.0)
    task = VariationalFieldAdam([layer], VariationalConfig(prior="task"), kl_weight=0.5)
    assert torch.equal(task.kl_gradient(layer), torch.zeros(2, 3))  # no prior before the first task ends
    task.consolidate()
    prior = layer.field.detach().clone()
    with torch.no_grad():
        layer.field.add_(0.1)
    _, var = field_moments(layer.field.detach(), 2.0)
    torch.testing.assert_close(task.kl_gradient(layer), 0.5 * 4.0 * var * (layer.field.detach() - prior))

    step = VariationalFieldAdam([layer], VariationalConfig(prior="step", lr=0.01), kl_weight=1.0)
    layer.field.grad = torch.ones(2, 3)
    before = layer.field.detach().clone()
    step.step()
    delta = layer.field.detach() - before
    # the first Adam step is −lr·sign(grad)
    torch.testing.assert_close(delta, torch.full((2, 3), -0.01), atol=1e-6, rtol=0)
    _, var = field_moments(layer.field.detach(), 2.0)
    torch.testing.assert_close(step.kl_gradient(layer), 4.0 * var * delta)


def test_annealed_beta_known_values() -> None:
    assert annealed_beta(0, 0, n_tasks=5, epochs=5) == pytest.approx(10 * math.tanh(0.1 + 2 / 25))
    assert annealed_beta(4, 4, n_tasks=5, epochs=5) == pytest.approx(10 * math.tanh(2.1))


def test_probit_perceptron_cross_entropy_is_the_mean_field_loss() -> None:
    torch.manual_seed(0)
    student = ProbitPerceptron(8, beta=1.3, init_std=1.0)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    ce = nn.functional.cross_entropy(student(x), y, reduction="none")
    m, var = field_moments(student.layer.field.detach(), 1.3)
    z = (x @ m.T).squeeze(1) / math.sqrt(8)
    v = torch.sqrt((x * x) @ var.T / 8).squeeze(1)
    sign = 2 * y.float() - 1
    expected = -torch.log(torch.distributions.Normal(0, 1).cdf(sign * z / v))
    torch.testing.assert_close(ce.detach(), expected, atol=1e-5, rtol=1e-5)


def test_teachers_and_overlaps() -> None:
    gen = torch.Generator().manual_seed(0)
    t1 = binary_teacher(4000, generator=gen)
    t2 = related_teacher(t1, 0.5, generator=gen)
    assert float(t1 @ t2 / 4000) == pytest.approx(0.5, abs=0.05)
    x, y = teacher_data(t1, 50, generator=gen)
    assert torch.equal(y, (x @ t1 > 0).long())
    r1, r2, q = overlaps(torch.tensor([1.0, 0.0, -1.0, 0.5]), [torch.tensor([1.0, 1.0, -1.0, 1.0])] * 2)
    assert (r1, r2, q) == (pytest.approx(2.5 / 4), pytest.approx(2.5 / 4), pytest.approx(2.25 / 4))
    assert generalization_error(1.0, 1.0) == 0.0 and generalization_error(0.0, 1.0) == 0.5


def test_binary_errors_name_the_bad_value() -> None:
    with pytest.raises(WeightlabError, match="prior must be 'task' or 'step', got 'bogus'"):
        VariationalConfig(prior="bogus")  # type: ignore[arg-type]
    with pytest.raises(WeightlabError, match="mode must be one of .* got 'x'"):
        with forward_mode(VariationalBinaryLinear(2, 2), "x"):  # type: ignore[arg-type]
            pass
    with pytest.raises(WeightlabError, match="overlap must lie in \\[-1, 1\\], got 2"):
        related_teacher(torch.ones(3), 2.0, generator=torch.Generator())
    with pytest.raises(WeightlabError, match="beta must be > 0, got -1"):
        set_beta(nn.Sequential(VariationalBinaryLinear(2, 2)), -1.0)
    with pytest.raises(WeightlabError, match="has no VariationalBinaryLinear"):
        set_beta(nn.Linear(2, 2), 1.0)
    with pytest.raises(WeightlabError, match="metaplasticity m must be ≥ 0, got -1"):
        MetaplasticityConfig(m=-1.0)
    with pytest.raises(WeightlabError, match="has no BinaryLinear"):
        MetaplasticAdam(nn.Linear(2, 2))
    with pytest.raises(WeightlabError, match="EWC lam must be ≥ 0, got -1"):
        EWCConfig(lam=-1.0)


# ------------------------------------------------------------------------------------------ metaplasticity


def test_meta_factor_damps_only_updates_towards_a_sign_flip() -> None:
    hidden = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5])
    exp_avg = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.2])  # step = −lr·exp_avg/denom
    f = meta_factor(hidden, exp_avg, 1.0)
    damp = 1 - math.tanh(1.0) ** 2
    expected = torch.tensor([damp, 1.0, 1.0, damp, 1 - math.tanh(0.5) ** 2])
    torch.testing.assert_close(f, expected)
    assert torch.equal(meta_factor(hidden, exp_avg, 0.0), torch.ones(5))  # m = 0: plain Adam


def test_metaplastic_adam_equals_adam_except_damped_entries() -> None:
    torch.manual_seed(0)
    lin_meta, lin_adam = BinaryLinear(4, 3), BinaryLinear(4, 3)
    lin_adam.load_state_dict(lin_meta.state_dict())
    grad = torch.randn(3, 4)
    for lin in (lin_meta, lin_adam):
        lin.weight.grad = grad.clone()
    w0 = lin_meta.weight.detach().clone()
    MetaplasticAdam(lin_meta, MetaplasticityConfig(m=2.0, lr=0.01, weight_decay=0.0)).step()
    torch.optim.Adam(lin_adam.parameters(), lr=0.01, betas=(0.9, 0.999)).step()
    d_meta, d_adam = lin_meta.weight.detach() - w0, lin_adam.weight.detach() - w0
    towards_flip = torch.sign(w0) * grad > 0
    assert towards_flip.any() and (~towards_flip).any()
    torch.testing.assert_close(d_meta[~towards_flip], d_adam[~towards_flip])
    damp = 1 - torch.tanh(2.0 * w0.abs()) ** 2
    torch.testing.assert_close(d_meta[towards_flip], (damp * d_adam)[towards_flip])


def test_sign_ste_and_binary_linear() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    lin = BinaryLinear(3, 2)
    a = torch.randn(4, 3)
    torch.testing.assert_close(lin(a), a @ torch.where(lin.weight >= 0, 1.0, -1.0).T)


# -------------------------------------------------------------------------------------------------- EWC


def test_diagonal_fisher_known_answer() -> None:
    model = nn.Linear(1, 2, bias=False)
    nn.init.zeros_(model.weight)  # softmax = (½, ½): per-sample grad = (p − onehot)·x
    data = ArrayDataset(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]))
    fisher = diagonal_fisher(model, data)
    torch.testing.assert_close(fisher["weight"], torch.full((2, 1), (0.25 + 1.0) / 2))


def test_ewc_penalty_and_callback() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    anchor = {"w": torch.tensor([0.0, 0.0])}
    assert ewc_penalty(params, anchor, {"w": torch.tensor([2.0, 0.5])}).item() == pytest.approx(0.5 * (2 + 2))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = ArrayDataset(torch.randn(16, 1, 2, 2), torch.randint(0, 3, (16,)))
    exp = Experience(data, data, data, (0, 1, 2), 0)
    ewc = EWC(model, EWCConfig(lam=10.0, fisher_samples=8))
    base = torch.tensor(1.0)
    assert ewc.loss(None, None, None, base) is base  # nothing consolidated yet
    train(model, data, TrainConfig(epochs=1, batch_size=8), callbacks=[ewc], experience=exp)
    assert set(ewc.fisher) == {"1.weight", "1.bias"}
    assert ewc.loss(None, None, None, base).item() == pytest.approx(1.0)  # at the anchor: no penalty
    with torch.no_grad():
        model[1].weight.add_(0.5)
    assert ewc.loss(None, None, None, base).item() > 1.0
    restored = EWC(model, EWCConfig(lam=10.0))
    restored.load_state_dict(ewc.state_dict())
    penalised = ewc.loss(None, None, None, base).item()
    assert restored.loss(None, None, None, base).item() == pytest.approx(penalised)
    with pytest.raises(WeightlabError, match="EWC needs train"):
        train(model, data, TrainConfig(epochs=1, batch_size=8), callbacks=[ewc])


# ---------------------------------------------------------------------------------------------- end to end


def _task0_after_two_tasks(make, seed: int = 0) -> float:
    stream = domain_incremental(digits("train"), digits("test"), 2, seed=3)
    torch.manual_seed(seed)
    model, opt_for = make()
    for i, exp in enumerate(stream):
        opt, callbacks = opt_for(model, i)
        train(model, exp.train, TrainConfig(epochs=3, batch_size=64, seed=i), optimizer=opt,
              callbacks=callbacks, experience=exp)
    torch.manual_seed(99)
    return accuracy(model, stream[0].test)


def test_metaplasticity_forgets_less_than_plain_binary_training() -> None:
    def make(m: float):
        return lambda: (BinaryMLP(64, 10, (64, 64)),
                        lambda model, i: (MetaplasticAdam(model, MetaplasticityConfig(m=m)), []))

    plain, meta = _task0_after_two_tasks(make(0.0)), _task0_after_two_tasks(make(20.0))
    assert meta > plain + 0.1


def test_previous_task_prior_forgets_less_than_no_prior() -> None:
    def make(kl_weight: float | None):
        def opt_for(model, i):
            vc = VariationalConfig(prior="task", kl_weight=kl_weight)
            opt = VariationalFieldAdam(binary_layers(model), vc,
                                       kl_weight=vc.resolved_kl_weight(n_train=1300, batch_size=64))
            if i:
                opt.consolidate()
            return opt, [BetaAnnealing(model, vc, n_tasks=2, epochs=3)]

        return lambda: (VariationalBinaryMLP(64, 10, (64, 64)), opt_for)

    no_prior, prior = _task0_after_two_tasks(make(0.0)), _task0_after_two_tasks(make(None))
    assert prior > no_prior + 0.05
