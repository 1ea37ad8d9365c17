"""GAIRAT and MAIL: their weight formulas on small tensors, κ, the burn-in and the limits that are plain AT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightlab.errors import WeightlabError
from weightlab.experiments.done import DoneConfig, run_one
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.done.baselines import (
    GAIRAT,
    MAIL,
    GAIRATConfig,
    MAILConfig,
    gairat_weights,
    mail_weights,
    probability_margin,
)
from weightlab.methods.done.implicit import BarrierPGD
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, train


def test_gairat_weights_known_answers() -> None:
    # λ = 0, K = 4, κ = 0, 2, 4: raw (1 + tanh 5)/2, 1/2, (1 + tanh −5)/2, normalised by their sum 1.5
    w = gairat_weights(torch.tensor([0, 2, 4]), 4, 0.0)
    assert w.tolist() == pytest.approx([0.666636401, 0.333333333, 3.0265246e-5], rel=1e-6)
    # λ = −1: raw (1 + tanh 4)/2 and (1 + tanh −6)/2
    assert gairat_weights(torch.tensor([0, 4]), 4, -1.0).tolist() == pytest.approx([0.99999385, 6.146198e-6],
                                                                                  rel=1e-5)
    with pytest.raises(WeightlabError, match="K ≥ 1 attack steps, got 0"):
        gairat_weights(torch.tensor([0]), 0, 0.0)


def test_probability_margin_and_mail_weights_known_answers() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    assert probability_margin(logits, torch.tensor([0, 2])).tolist() == pytest.approx([0.2, -0.3], abs=1e-6)
    # γ = 10, β = −0.5, margins 0, −0.5, 0.5: raw σ(−5), σ(0) = 1/2, σ(−10)
    w = mail_weights(torch.tensor([0.0, -0.5, 0.5]), 10.0, -0.5)
    assert w.tolist() == pytest.approx([0.0132077082, 0.9867027034, 8.95883996e-5], rel=1e-6)


class _Fixed(nn.Module):
    """Logits that ignore the input: class ``c`` always wins."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c, self.w = c, nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 3) + self.w * x.flatten(1).sum(1, keepdim=True)
        logits[:, self.c] += 5.0
        return logits


def test_kappa_counts_the_iterates_still_classified_correctly() -> None:
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 0, 1, 2])
    _, kappa = BarrierPGD(eps=0.1, steps=5).solve(_Fixed(0), x, y)
    assert kappa.tolist() == [5, 5, 0, 0]


class _State:
    def __init__(self, step: int, total: int) -> None:
        self.step, self.total_steps, self.generator = step, total, torch.Generator().manual_seed(0)


def test_burn_in_is_plain_adversarial_training_then_reweighting() -> None:
    gairat = GAIRAT(PGD(eps=0.1, steps=4), GAIRATConfig(lam=0.0, burn_in=0.5))
    gairat._kappa = torch.tensor([0, 2, 4])
    losses = torch.ones(3)
    assert gairat.sample_weights(_State(4, 10), None, losses) is None  # step 4 of 10: still burning in
    assert torch.allclose(gairat.sample_weights(_State(5, 10), None, losses), gairat_weights(gairat._kappa, 4, 0.0))
    # one reweighted batch: ESS / B = 1 / (Σ w²) / 3 with w = (0.666636, 0.333333, 0.0000303)
    assert gairat.diagnostics()["ess_fraction_median"] == pytest.approx(1 / (0.666636401**2 + 1 / 9) / 3, rel=1e-5)
    mail = MAIL(PGD(), MAILConfig(burn_in=0.0))
    mail.transform_logits(_State(0, 1), type("B", (), {"y": torch.tensor([0, 2])})(),
                          torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])))
    assert torch.allclose(mail.sample_weights(_State(0, 1), None, torch.ones(2)),
                          mail_weights(torch.tensor([0.2, -0.3]), 1.0, -1.5))


def _train(digits8, cb) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(10, width=4)
    train(model, digits8[0], TrainConfig(max_steps=4, batch_size=32, lr=0.05, seed=0), callbacks=[cb])
    return model


@pytest.mark.parametrize("flat", [GAIRAT(PGD(eps=0.1, steps=2), GAIRATConfig(lam=50.0, burn_in=0.0)),
                                  MAIL(PGD(eps=0.1, steps=2), MAILConfig(gamma=1e-9, burn_in=0.0))])
def test_flat_weight_curves_are_plain_adversarial_training(digits8, flat) -> None:
    at = _train(digits8, AdversarialTraining(PGD(eps=0.1, steps=2)))
    reweighted = _train(digits8, flat)
    for a, b in zip(at.state_dict().values(), reweighted.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_steep_weights_change_training(digits8) -> None:
    at = _train(digits8, AdversarialTraining(PGD(eps=0.1, steps=2)))
    gairat = _train(digits8, GAIRAT(PGD(eps=0.1, steps=2), GAIRATConfig(lam=0.0, burn_in=0.0)))
    assert not torch.allclose(at.head.weight, gairat.head.weight, atol=1e-4)


def test_config_errors() -> None:
    with pytest.raises(WeightlabError, match="burn_in must be a fraction of training in \\[0, 1\\), got 1.5"):
        GAIRATConfig(burn_in=1.5)
    with pytest.raises(WeightlabError, match="GAIRAT lam must be finite, got inf"):
        GAIRATConfig(lam=math.inf)
    with pytest.raises(WeightlabError, match="GAIRAT counts κ along linf PGD, got an attack with norm 'l2'"):
        GAIRAT(PGD(norm="l2"))
    with pytest.raises(WeightlabError, match="MAIL gamma must be a finite number > 0, got 0"):
        MAILConfig(gamma=0)
    with pytest.raises(WeightlabError, match="MAIL beta must be finite, got nan"):
        MAILConfig(beta=math.nan)


@pytest.fixture(scope="module")
def imbalanced_at() -> tuple[DoneConfig, dict]:
    config = DoneConfig(data="digits", image_size=8, n_train=200, n_val=20, width=8, at_epochs=4, eval_steps=5,
                        batch_size=64, imbalance=10.0, aa_per_class=0, gairat_burn_in=0.0,
                        mail_burn_in=0.0, mail_gamma=10.0)  # a steep MAIL curve (the authors' γ = 1 is gentle)
    return config, run_one(config, "imbalanced", "AT", math.nan, 0)


@pytest.mark.parametrize(("method", "value"), [("GAIRAT", -1.0), ("MAIL", -0.5), ("DONE (implicit)", 0.5)])
def test_reweighting_arms_raise_minority_class_robust_accuracy_on_imbalanced_digits(imbalanced_at, method,
                                                                                    value) -> None:
    config, at = imbalanced_at
    out = run_one(config, "imbalanced", method, value, 0)
    minority = slice(3, 10)  # classes 3..9 keep < half their training images at 10:1
    assert sum(out["per_class"][minority]) > sum(at["per_class"][minority]) + 0.3
    assert out["n"] == at["n"] and out["diagnostics"]["n_train"] == at["diagnostics"]["n_train"]  # same data


def test_selection_takes_the_best_validation_tail_and_breaks_ties_towards_the_flatter_weights(monkeypatch) -> None:
    from weightlab.experiments import done as experiment

    tails = {-2.0: 0.1, -1.0: 0.3, 0.0: 0.3}  # λ → validation tail-30%: a tie between −1 and 0
    monkeypatch.setattr(experiment, "fit", lambda config, split, method, value, seed: (value, {}))
    monkeypatch.setattr(experiment, "robust_summary", lambda model, data, attack, seed: {
        "clean": 0.5, "robust": 0.4, "robust_tail30": tails[model]})
    monkeypatch.setattr(experiment, "splits_for", lambda config, split, seed: (None, None, None))
    config = DoneConfig(gairat_lambda_grid=tuple(tails))
    chosen = experiment.select(config, "imbalanced", "GAIRAT", 0)
    assert chosen["name"] == "λ" and chosen["value"] == 0.0 and [r["value"] for r in chosen["grid"]] == list(tails)
    assert experiment.tuned_by("DONE (implicit)") == "DONE" and experiment.tuned_by("AT") is None
    assert experiment.tuned_by("MAIL") == "MAIL"
