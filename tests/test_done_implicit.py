"""DONE's full CID: the log-barrier lower level, conjugate gradient and the implicit gradient term."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD
from weightlab.methods.done.dro import DONE, DONEConfig
from weightlab.methods.done.implicit import (
    BarrierPGD,
    conjugate_gradient,
    held_coordinates,
    implicit_gradient,
    log_barrier,
)
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, train


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_zero_barrier_is_pgd_step_for_step(digits8) -> None:
    torch.manual_seed(0)
    model = SmallCNN(10, width=4)
    x, y = digits8[0].x[:16], digits8[0].y[:16]
    plain = PGD(eps=0.1, steps=3)(model, x, y, generator=torch.Generator().manual_seed(1))
    barrier = BarrierPGD(eps=0.1, steps=3)(model, x, y, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, barrier)


def test_barrier_solution_is_strictly_inside_the_ball() -> None:
    model, x, y = _tiny(), torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64), torch.tensor([0, 1])
    adv = BarrierPGD(eps=0.2, steps=50, step_size=0.05, barrier=0.01)(model, x, y)
    assert (adv - x).abs().max() < 0.2 and torch.isfinite(log_barrier(adv - x, 0.2)).all()


def test_conjugate_gradient_solves_spd_systems_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + torch.eye(4, dtype=torch.float64)  # (2, 4, 4), SPD per sample
    b = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    v = conjugate_gradient(lambda p: (a @ p.unsqueeze(-1)).squeeze(-1), b, steps=4,
                           preconditioner=torch.ones_like(b))
    assert torch.allclose(v, torch.linalg.solve(a, b), atol=1e-10)
    # a sample with negative curvature stops at once (its iterate stays 0); the other is still solved
    a[1] = -a[1]
    v = conjugate_gradient(lambda p: (a @ p.unsqueeze(-1)).squeeze(-1), b, steps=4,
                           preconditioner=torch.ones_like(b))
    assert torch.allclose(v[0], torch.linalg.solve(a[0], b[0]), atol=1e-10) and torch.equal(v[1], torch.zeros(4,
                                                                                          dtype=torch.float64))


def _lower_level(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: BarrierPGD) -> torch.Tensor:
    return attack(model, x, y) - x


@pytest.mark.parametrize("at_box", [False, True])
def test_implicit_gradient_matches_finite_differences_of_the_lower_level_solution(at_box: bool) -> None:
    model = _tiny()
    x = 0.5 + 0.1 * torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if at_box:  # pixels at 0 and 1: where the ascent pushes out of [0, 1] the box holds δ, and ∂δ_j/∂θ = 0
        x[:, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = torch.tensor([0, 2])
    eps, mu = 0.2, 0.02
    attack = BarrierPGD(eps=eps, steps=1500, step_size=0.04, barrier=mu, ascent="gradient", random_start=False)
    delta = _lower_level(model, x, y, attack)
    point = delta.clone().requires_grad_(True)  # the solution is stationary: ∇_δ G = 0
    objective = nn.functional.cross_entropy(model(x + point), y, reduction="sum") + mu * log_barrier(point, eps).sum()
    (stationarity,) = torch.autograd.grad(objective, point)
    held = held_coordinates(x, delta, attack.radius)
    assert bool(held.any()) == at_box and delta.abs().max() < eps * 0.99
    assert stationarity[~held].abs().max() < 1e-10
    b = torch.randn(delta.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms = implicit_gradient(model, x, y, delta, b, eps=eps, barrier=mu, radius=attack.radius, cg_steps=8)
    u = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    theta, h = parameters_to_vector(model.parameters()).detach().clone(), 1e-5
    vector_to_parameters(theta + h * u, model.parameters())
    plus = _lower_level(model, x, y, attack)
    vector_to_parameters(theta - h * u, model.parameters())
    minus = _lower_level(model, x, y, attack)
    vector_to_parameters(theta, model.parameters())
    finite = float((b * (plus - minus) / (2 * h)).sum())  # ⟨b, (∂δ*/∂θ) u⟩
    implicit = float(parameters_to_vector(terms) @ u)  # ⟨(∂δ*/∂θ)ᵀ b, u⟩
    assert abs(finite) > 1e-3 and implicit == pytest.approx(finite, rel=1e-6)


def _train(digits8, config: DONEConfig) -> tuple[nn.Module, DONE]:
    # A smooth network: with max-pooling some pixels get an input gradient of exactly 0, where PGD's signed
    # step is 0 and any barrier, however small, tips the sign (the limit μ → 0 is exact wherever ∇ℓ ≠ 0).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    done = DONE(PGD(eps=0.1, steps=2), config)
    train(model, digits8[0], TrainConfig(max_steps=4, batch_size=32, lr=0.05, seed=0), callbacks=[done])
    return model, done


def test_vanishing_barrier_without_implicit_term_is_todays_done(digits8) -> None:
    today, done = _train(digits8, DONEConfig(r=0.5))
    limit, barrier = _train(digits8, DONEConfig(r=0.5, barrier=1e-14, margin=1e-9))
    assert isinstance(barrier.attack, BarrierPGD) and not isinstance(done.attack, BarrierPGD)
    assert barrier.sums == pytest.approx(done.sums, abs=1e-6) and barrier.ess == pytest.approx(done.ess, abs=1e-6)
    for a, b in zip(today.state_dict().values(), limit.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    strong, _ = _train(digits8, DONEConfig(r=0.5, barrier=0.1))  # a real barrier does change training
    assert not torch.allclose(strong[-1].weight, today[-1].weight, atol=1e-4)


class _State:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.generator = model, torch.Generator().manual_seed(0)


def test_implicit_option_adds_exactly_the_implicit_term_to_the_gradient(digits8) -> None:
    torch.manual_seed(0)
    model = SmallCNN(10, width=4, batchnorm=False)
    done = DONE(PGD(eps=0.1, steps=2), DONEConfig(r=0.5, barrier=0.01, implicit=True, cg_steps=3))
    from weightlab.data.arrays import Batch

    clean = Batch(digits8[0].x[:8], digits8[0].y[:8], None)
    state = _State(model)
    batch = done.on_batch(state, clean)
    losses = nn.functional.cross_entropy(model(batch.x), batch.y, reduction="none")
    loss = (done.sample_weights(state, batch, losses) * losses).sum()
    params = list(model.parameters())
    upper = torch.autograd.grad(loss, batch.x, retain_graph=True)[0]
    expected = implicit_gradient(model, clean.x, clean.y, batch.x.detach() - clean.x, upper, eps=0.1, barrier=0.01,
                                 radius=done.attack.radius, cg_steps=3)
    plain = torch.autograd.grad(loss, params, retain_graph=True)
    total = done.loss(state, batch, model(batch.x), loss)
    assert float(total.detach()) == pytest.approx(float(loss.detach()))
    got = torch.autograd.grad(total, params)
    assert any(float(e.abs().max()) > 0 for e in expected)
    for g, p, e in zip(got, plain, expected, strict=True):
        assert torch.allclose(g - p, e, atol=1e-6)


def test_config_errors() -> None:
    with pytest.raises(WeightlabError, match="barrier must be a finite number ≥ 0, got -1"):
        DONEConfig(barrier=-1)
    with pytest.raises(WeightlabError, match="DONE implicit needs the barrier lower level: a barrier > 0, got 0"):
        DONEConfig(implicit=True)
    with pytest.raises(WeightlabError, match="cg_steps must be ≥ 1, got 0"):
        DONEConfig(cg_steps=0)
    with pytest.raises(WeightlabError, match="log barrier is for the linf ball"):
        BarrierPGD(barrier=0.1, norm="l2")
    with pytest.raises(WeightlabError, match="ascent must be 'sign' or 'gradient'"):
        BarrierPGD(ascent="newton")
