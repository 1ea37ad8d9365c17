"""AutoAttack (torchattacks' APGD-CE, APGD-T, FAB-T, Square composed as the standard ensemble).

torchattacks is a required test dependency (the ``attacks`` extra, installed by ``make``): these tests import
it unconditionally, so a missing package fails them instead of skipping them.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torchattacks  # noqa: F401 - fail, don't skip, when the extra is missing
from torch import nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.autoattack import (
    AutoAttackConfig,
    autoattack,
    autoattack_evaluate,
    binomial_se,
    per_class_rate,
    stratified_subset,
)

FAST = {"apgd_steps": 10, "fab_steps": 10, "square_queries": 100}


@pytest.fixture(autouse=True)
def one_thread():
    """The attacks run many tiny ops on 2×2 images, where a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_problem(n: int = 60) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 10-class linear model on 2×2 images inside [0.3, 0.7] (so an ε ≤ 0.3 ball stays in [0, 1]), labelled
    by its own prediction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    x = 0.3 + 0.4 * torch.rand(n, 1, 2, 2)  # (N, 1, 2, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def exactly_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """For a linear model the ℓ∞ worst case is closed-form: the point is robust iff every margin
    ``(w_y − w_j)·x + b_y − b_j`` exceeds ``ε·‖w_y − w_j‖₁``."""
    w, b = model[1].weight.detach(), model[1].bias.detach()  # (10, 4), (10,)
    d = w[y][:, None, :] - w[None, :, :]  # (N, 10, 4)
    margin = (d * x.flatten(1)[:, None, :]).sum(-1) + b[y][:, None] - b[None, :] - eps * d.abs().sum(-1)
    margin[torch.arange(len(y)), y] = 1.0
    return (margin > 0).all(1)  # (N,)


@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_robust_accuracy_of_a_linear_model_is_the_closed_form_answer(eps: float) -> None:
    model, x, y = linear_problem()
    result = autoattack_evaluate(model, ArrayDataset(x, y), AutoAttackConfig(eps=eps, **FAST))
    expected = exactly_robust(model, x, y, eps)
    assert result.correct == expected.tolist()
    assert 0 < expected.sum() < len(y)  # the test has both kinds of point
    assert result.clean_accuracy == 1.0 and sum(result.broken_by.values()) == int((~expected).sum())


def test_adversarial_images_stay_in_the_ball_and_the_box_and_only_broken_points_move() -> None:
    model, x, y = linear_problem(30)
    x = x.clamp(0.35, 0.65) - 0.3  # near 0 so that the [0, 1] box binds
    adv, broken = autoattack(model, x, y, AutoAttackConfig(eps=0.1, **FAST))
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    still = broken == 4  # robust to all four
    assert torch.equal(adv[still], x[still])
    with torch.no_grad():
        assert (model(adv[~still]).argmax(1) != y[~still]).all()


def test_a_constant_model_is_as_robust_as_it_is_accurate_and_misclassified_points_are_marked() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.arange(10.0))  # always class 9

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)

    x = torch.rand(20, 1, 2, 2)
    y = torch.tensor([9] * 5 + [0] * 15)
    result = autoattack_evaluate(Constant(), ArrayDataset(x, y), AutoAttackConfig(eps=0.3, **FAST))
    assert result.robust_accuracy == result.clean_accuracy == 0.25
    assert result.broken_by == {"apgd-ce": 0, "apgd-t": 0, "fab-t": 0, "square": 0}
    assert result.per_class[9] == 1.0 and result.per_class[0] == 0.0 and result.worst_class == 0.0


def test_deterministic_for_a_seed_and_leaves_mode_and_global_rng_alone() -> None:
    model, x, y = linear_problem(30)
    model.train()
    config = AutoAttackConfig(eps=0.05, attacks=("apgd-ce", "square"), **FAST)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, _ = autoattack(model, x, y, config)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    second, _ = autoattack(model, x, y, config)
    assert torch.equal(first, second)


def test_per_class_rate_binomial_se_and_stratified_subset_known_answers() -> None:
    hits = torch.tensor([True, False, True, True])
    y = torch.tensor([0, 0, 1, 1])
    rate = per_class_rate(hits, y, 3)
    assert rate[:2].tolist() == [0.5, 1.0] and torch.isnan(rate[2])
    assert binomial_se(0.5, 100) == pytest.approx(0.05) and binomial_se(1.0, 10) == 0.0
    data = ArrayDataset(torch.rand(12, 1, 2, 2), torch.tensor([0] * 6 + [1] * 4 + [2] * 2))
    sub = stratified_subset(data, 3, seed=0)
    assert torch.bincount(sub.y).tolist() == [3, 3, 2]
    assert torch.equal(sub.x, stratified_subset(data, 3, seed=0).x)


def test_bad_input_and_a_missing_torchattacks_raise_one_line_errors(monkeypatch) -> None:
    with pytest.raises(WeightlabError, match="eps must be a finite number > 0, got -0.1"):
        AutoAttackConfig(eps=-0.1)
    with pytest.raises(WeightlabError, match="attacks must be some of apgd-ce.*got \\('pgd',\\)"):
        AutoAttackConfig(attacks=("pgd",))  # type: ignore[arg-type]
    with pytest.raises(WeightlabError, match="n_targets must be in \\[1, 9\\], got 10"):
        AutoAttackConfig(n_targets=10)
    model, x, y = linear_problem(4)
    with pytest.raises(WeightlabError, match="4 images but 3 labels"):
        autoattack(model, x, y[:3], AutoAttackConfig())
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(WeightlabError, match=r"needs torchattacks.*weightlab\[attacks\]"):
        autoattack(model, x, y, AutoAttackConfig(**FAST))
