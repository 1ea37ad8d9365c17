"""Attacks, robust metrics and adversarial training (papers rift, done, rws)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.data import digits
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import (
    PGD,
    AdversarialTraining,
    adversarial_predict,
    check_images,
    fgsm,
    pgd,
    project,
    tail_metrics,
)
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, per_class_accuracy, train


@pytest.fixture(scope="module")
def trained_cnn() -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tr, te = digits("train"), digits("test")
    model = SmallCNN(10, width=8)
    train(model, tr, TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0))
    return model, te.x[:128], te.y[:128]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_the_input(trained_cnn, norm: str) -> None:
    model, x, y = trained_cnn
    assert torch.equal(pgd(model, x, y, eps=0.0, steps=3, step_size=0.1, norm=norm), x)
    assert torch.equal(fgsm(model, x, y, eps=0.0), x)


@settings(max_examples=12, deadline=None)
@given(
    eps=st.floats(0.0, 0.6),
    steps=st.integers(1, 3),
    norm=st.sampled_from(["linf", "l2"]),
    start=st.booleans(),
    seed=st.integers(0, 100),
)
def test_adversarial_examples_stay_in_ball_and_range(trained_cnn, eps, steps, norm, start, seed) -> None:
    model, x, y = trained_cnn
    x, y = x[:16], y[:16]
    adv = PGD(eps=eps, steps=steps, step_size=0.5, norm=norm, random_start=start)(
        model, x, y, generator=torch.Generator().manual_seed(seed)
    )
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()


def test_project_known_answer() -> None:
    d = torch.tensor([[[[3.0, 4.0]]], [[[0.3, 0.0]]]])  # norms 5 and 0.3
    out = project(d.clone(), 1.0, "l2")
    assert torch.allclose(out, torch.tensor([[[[0.6, 0.8]]], [[[0.3, 0.0]]]]))
    assert torch.equal(project(d.clone(), 0.5, "linf"), torch.tensor([[[[0.5, 0.5]]], [[[0.3, 0.0]]]]))


def test_fgsm_is_one_signed_step() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    assert torch.allclose(fgsm(model, x, y, eps=0.1), (x + 0.1 * g.sign()).clamp(0, 1))


def test_pgd_loss_at_least_fgsm_loss_and_accuracy_drops(trained_cnn) -> None:
    model, x, y = trained_cnn
    eps = 0.15
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    model.eval()
    loss_f = F.cross_entropy(model(fgsm(model, x, y, eps=eps)), y).item()
    loss_p = F.cross_entropy(model(pgd(model, x, y, eps=eps, steps=10, step_size=eps / 4)), y).item()
    assert loss_p >= loss_f > clean


def test_attack_uses_eval_mode_and_restores_it(trained_cnn) -> None:
    model, x, y = trained_cnn
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    running = model.body[1].running_mean.clone()
    try:
        model.train()
        pgd(model, x[:8], y[:8], eps=0.1, steps=2)
        assert model.training and seen and not any(seen)
        model.eval()
        pgd(model, x[:8], y[:8], eps=0.1, steps=2)
        assert not model.training
    finally:
        hook.remove()
    assert torch.equal(model.body[1].running_mean, running)  # BN statistics untouched


def test_bad_input_errors(trained_cnn) -> None:
    model, x, y = trained_cnn
    with pytest.raises(WeightlabError, match=r"eps must be a finite number ≥ 0, got -0.1"):
        PGD(eps=-0.1)
    with pytest.raises(WeightlabError, match=r"steps must be ≥ 1, got 0"):
        PGD(steps=0)
    with pytest.raises(WeightlabError, match=r"norm must be 'linf' or 'l2', got 'l1'"):
        PGD(norm="l1")  # type: ignore[arg-type]
    with pytest.raises(WeightlabError, match=r"images in \[0, 1\], got values in \[-0.5"):
        pgd(model, x - 0.5, y, eps=0.1)
    with pytest.raises(WeightlabError, match=r"x must hold images in \[0, 1\].*255"):
        check_images(x * 255)
    with pytest.raises(WeightlabError, match="tail_fraction"):
        tail_metrics(torch.ones(3), tail_fraction=0.0)


def test_tail_metrics_known_answer() -> None:
    per_class = torch.tensor([0.9, 0.1, 0.5, float("nan"), 0.7, 0.3])
    m = tail_metrics(per_class, tail_fraction=0.3)  # 5 classes with samples -> ceil(1.5) = 2 in the tail
    assert m["worst"] == pytest.approx(0.1)
    assert m["tail"] == pytest.approx(0.2)
    assert m["mean"] == pytest.approx(0.5)


def test_adversarial_training_raises_robust_accuracy(digits8) -> None:
    tr, te = digits8
    attack = PGD(eps=0.1, steps=5)
    results = {}
    for name, cbs in (("std", []), ("at", [AdversarialTraining(PGD(eps=0.1, steps=3))])):
        torch.manual_seed(0)
        model = SmallCNN(10, width=8)
        train(model, tr, TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0), callbacks=cbs)
        logits, y = adversarial_predict(model, te, attack)
        results[name] = per_class_accuracy(logits, y, 10).nanmean().item()
    assert results["at"] > results["std"] + 0.1
