"""DONE: closed-form KL-DRO weights, the running normaliser, the callback and the experiment's direction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.cli import main
from weightlab.data import digits
from weightlab.errors import WeightlabError
from weightlab.experiments.done import DoneConfig, done_claims, floor_notes, run_one
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.done.dro import (
    DONE,
    DONEConfig,
    RunningNormaliser,
    dro_objective,
    dro_weights,
    effective_sample_size,
)
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, train


def test_dro_weights_known_answer() -> None:
    losses = torch.tensor([0.0, math.log(2.0), math.log(5.0)])
    assert torch.allclose(dro_weights(losses, 1.0), torch.tensor([1 / 8, 2 / 8, 5 / 8]))
    assert torch.allclose(dro_weights(losses, math.inf), torch.full((3,), 1 / 3))
    assert dro_weights(losses, 1e-4).argmax().item() == 2  # r → 0: the max loss


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 20), min_size=2, max_size=16), st.floats(0.05, 50))
def test_dro_weights_are_a_distribution_that_keeps_the_loss_order(values, r) -> None:
    losses = torch.tensor(values)
    w = dro_weights(losses, r)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
    i, j = losses.argmax(), losses.argmin()
    assert w[i] >= w[j]


def test_gradient_of_dro_objective_is_the_weighted_loss_gradient() -> None:
    losses = torch.tensor([0.3, 1.2, 2.5], requires_grad=True)
    (grad,) = torch.autograd.grad(dro_objective(losses, 0.7), losses)
    assert torch.allclose(grad, dro_weights(losses, 0.7))


def test_running_normaliser_known_answer() -> None:
    norm = RunningNormaliser(r=1.0, beta=0.5)
    first = torch.tensor([0.0, math.log(3.0)])  # mean exp = 2
    assert torch.allclose(norm.weights(first), dro_weights(first, 1.0))
    second = torch.tensor([math.log(4.0), math.log(8.0)])  # mean exp = 6 → u = 0.5·2 + 0.5·6 = 4
    assert torch.allclose(norm.weights(second), torch.tensor([4 / (2 * 4), 8 / (2 * 4)]))
    assert norm.log_u.item() == pytest.approx(math.log(4.0))


def test_config_errors() -> None:
    with pytest.raises(WeightlabError, match="DONE r must be > 0 .*got -1"):
        DONEConfig(r=-1)
    with pytest.raises(WeightlabError, match=r"beta must be in \(0, 1\] or None, got 1.5"):
        DONEConfig(beta=1.5)
    with pytest.raises(WeightlabError, match="r must be > 0, got 0"):
        dro_weights(torch.ones(2), 0)


def _train(digits8, cb) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(10, width=4)
    train(model, digits8[0], TrainConfig(max_steps=4, batch_size=32, lr=0.05, seed=0), callbacks=[cb])
    return model


def test_infinite_r_is_plain_adversarial_training(digits8) -> None:
    attack = PGD(eps=0.1, steps=2)
    at = _train(digits8, AdversarialTraining(attack))
    uniform = _train(digits8, DONE(attack, DONEConfig(r=math.inf)))
    for a, b in zip(at.state_dict().values(), uniform.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_shuffle_control_permutes_the_weights() -> None:
    class State:
        generator = torch.Generator().manual_seed(0)

    losses = torch.tensor([0.1, 0.5, 2.0, 3.0])
    shuffled = DONE(PGD(), DONEConfig(r=0.5, shuffle=True)).sample_weights(State(), None, losses)
    plain = dro_weights(losses, 0.5)
    assert torch.allclose(shuffled.sort().values, plain.sort().values) and not torch.allclose(
        shuffled, plain
    )


def test_bad_cli_input_exits_2(tmp_path, capsys) -> None:
    args = ["run", "done", "--profile", "smoke", "--set"]
    assert main([*args, "methods=ATT", "--out", str(tmp_path / "d")]) == 2
    assert "methods: 'ATT' is not one of AT, DONE" in capsys.readouterr().err
    assert main([*args, "eps=-0.1", "--out", str(tmp_path / "e")]) == 2
    assert "eps must be > 0, got -0.1" in capsys.readouterr().err


def test_effective_sample_size_known_answers() -> None:
    assert effective_sample_size(torch.full((8,), 0.125)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1 / 0.375)


class _State:
    generator = torch.Generator().manual_seed(0)


def test_step_correction_divides_by_the_running_mean_of_the_weight_sums() -> None:
    done = DONE(PGD(), DONEConfig(r=1.0, beta=0.5, step_correction=True))
    first = torch.tensor([0.0, math.log(3.0)])  # u = 2: the running weights are the exact ones, Σw = 1
    assert torch.allclose(done.sample_weights(_State(), None, first), dro_weights(first, 1.0))
    second = torch.tensor([math.log(4.0), math.log(8.0)])  # u = 4 → w = (0.5, 1), Σw = 1.5
    mean_sum = 0.5 * 1.0 + 0.5 * 1.5
    assert torch.allclose(done.sample_weights(_State(), None, second), torch.tensor([0.5, 1.0]) / mean_sum)
    diag = done.diagnostics()
    assert diag["weight_sum_min"] == pytest.approx(1.0) and diag["weight_sum_max"] == pytest.approx(1.5)
    # ESS / B per batch: 1 / (0.25² + 0.75²) / 2 = 0.8 and 1.5² / 1.25 / 2 = 0.9; torch's median is the lower
    assert diag["ess_fraction_median"] == pytest.approx(0.8)
    with pytest.raises(WeightlabError, match="step_correction needs the running normaliser"):
        DONEConfig(step_correction=True)


def test_done_raises_minority_class_robust_accuracy_on_imbalanced_digits() -> None:
    config = DoneConfig(data="digits", image_size=8, n_train=200, n_val=20, width=8, at_epochs=4, eval_steps=5,
                        batch_size=64, imbalance=10.0, aa_per_class=0)
    at = run_one(config, "imbalanced", "AT", 0.5, 0)
    done = run_one(config, "imbalanced", "DONE", 0.5, 0)
    minority = slice(3, 10)  # classes 3..9 keep < half their training images at 10:1
    assert sum(done["per_class"][minority]) > sum(at["per_class"][minority]) + 0.3
    assert done["robust"] > at["robust"]
    assert done["diagnostics"]["weight_sum_min"] == pytest.approx(1.0, abs=1e-5)  # per-batch weights sum to 1
    assert 0 < done["diagnostics"]["ess_fraction_median"] < 1 and "ess_fraction_median" not in at["diagnostics"]
    p, n = at["robust"], at["n"]
    assert n == len(digits("test")) and at["robust_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))


def test_image_splits_are_balanced_disjoint_and_seeded() -> None:
    from weightlab.experiments._robust import image_splits

    train_set, val_set, test_set = image_splits("digits", 8, n_train=50, n_val=10, n_test=5, seed=3)
    assert torch.bincount(train_set.y).tolist() == [50] * 10 and torch.bincount(val_set.y).tolist() == [10] * 10
    assert torch.bincount(test_set.y).tolist() == [5] * 10
    rows = lambda d: {tuple(v) for v in d.x.flatten(1).tolist()}  # noqa: E731
    assert not rows(train_set) & rows(val_set)  # no image in both
    again, _, _ = image_splits("digits", 8, n_train=50, n_val=10, n_test=5, seed=3)
    other, _, _ = image_splits("digits", 8, n_train=50, n_val=10, n_test=5, seed=4)
    assert torch.equal(again.x, train_set.x) and not torch.equal(other.x, train_set.x)


def test_floor_note_names_only_splits_where_autoattack_tail_is_zero_everywhere() -> None:
    config = DoneConfig(methods=("AT", "DONE"), aa_methods=("AT", "DONE"), splits=("balanced", "imbalanced"))

    def record(balanced_done: float) -> dict:
        aa = {"balanced": {"AT": 0.0, "DONE": balanced_done}, "imbalanced": {"AT": 0.0, "DONE": 0.0}}
        return {"runs": {d: {m: {"autoattack": {"robust_tail30": v}} for m, v in arms.items()}
                         for d, arms in aa.items()}}

    notes = floor_notes(config, [record(0.0), record(0.1)])  # balanced: one seed above 0
    assert len(notes) == 1 and notes[0].startswith("imbalanced: floor") and "AT, DONE" in notes[0]
    assert len(floor_notes(config, [record(0.0)])) == 2
    assert floor_notes(DoneConfig(methods=("AT", "DONE"), aa_methods=("AT", "DONE"), aa_per_class=0),
                       [record(0.0)]) == []


def test_autoattack_tail_claim_at_the_floor_is_inconclusive_not_a_verdict_against_done() -> None:
    config = DoneConfig(methods=("AT", "DONE"), aa_methods=("AT", "DONE"), splits=("imbalanced",))

    def record(tail: float) -> dict:
        run = {"robust_tail30": tail, "robust": 0.3, "robust_worst": 0.0, "clean": 0.8,
               "autoattack": {"robust_tail30": tail, "robust": 0.2}}
        return {"runs": {"imbalanced": {"AT": run, "DONE": run}}}

    floor = done_claims(config, [record(0.0), record(0.0), record(0.0)], "imbalanced", "AT")[-1]
    assert floor.verdict == "inconclusive"
    tie = done_claims(config, [record(0.1), record(0.1), record(0.1)], "imbalanced", "AT")[-1]
    assert tie.verdict == "not held"  # equal above the floor is a measured tie: DONE does not raise the tail
