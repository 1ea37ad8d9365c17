"""End-to-end directions at tiny scale, and the two experiments through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from weightlab.cli import main
from weightlab.data import digits, domain_incremental
from weightlab.experiments.base import run_experiment
from weightlab.experiments.rnn_hypernetwork import RnnHypernetConfig, make_hnet
from weightlab.methods.binary_cl.metaplasticity import BinaryMLP, MetaplasticAdam, MetaplasticityConfig
from weightlab.methods.binary_cl.variational import (
    BetaAnnealing,
    VariationalBinaryMLP,
    VariationalConfig,
    VariationalFieldAdam,
    binary_layers,
)
from weightlab.methods.hypernet.hypernetworks import ChunkedMLPHyperNet, count_parameters
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, accuracy, train


def _task0_after_two_tasks(make, seed: int = 0) -> float:  # noqa: ANN001
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
    def make(m: float):  # noqa: ANN202
        return lambda: (BinaryMLP(64, 10, (64, 64)),
                        lambda model, i: (MetaplasticAdam(model, MetaplasticityConfig(m=m)), []))

    plain, meta = _task0_after_two_tasks(make(0.0)), _task0_after_two_tasks(make(20.0))
    assert meta > plain + 0.1


def test_previous_task_prior_forgets_less_than_no_prior() -> None:
    def make(kl_weight: float | None):  # noqa: ANN202
        def opt_for(model, i):  # noqa: ANN001, ANN202
            vc = VariationalConfig(prior="task", kl_weight=kl_weight)
            opt = VariationalFieldAdam(binary_layers(model), vc,
                                       kl_weight=vc.resolved_kl_weight(n_train=1300, batch_size=64))
            if i:
                opt.consolidate()
            return opt, [BetaAnnealing(model, n_tasks=2, epochs=3)]

        return lambda: (VariationalBinaryMLP(64, 10, (64, 64)), opt_for)

    no_prior, prior = _task0_after_two_tasks(make(0.0)), _task0_after_two_tasks(make(None))
    assert prior > no_prior + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", ["variational-binary-cl", "rnn-hypernetwork"])
def test_smoke_profile_runs_and_reports_claims(name: str, tmp_path) -> None:  # noqa: ANN001
    assert main(["run", name, "--profile", "smoke", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["claims"] and all(isinstance(c["held"], bool) for c in results["claims"])


def test_bad_config_values_exit_with_status_2(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["run", "variational-binary-cl", "--set", "methods=bogus", "--out", str(tmp_path / "a")]) == 2
    assert "methods: 'bogus' is not one of variational-task" in capsys.readouterr().err
    assert main(["run", "rnn-hypernetwork", "--set", "scenarios=rotated", "--out", str(tmp_path / "b")]) == 2
    assert "scenarios: 'rotated' is not one of split, permuted" in capsys.readouterr().err
    assert main(["run", "rnn-hypernetwork", "--set", "n_tasks=3", "--out", str(tmp_path / "c")]) == 2
    assert "n_tasks must be ≥ 2 and divide the 10 classes, got 3" in capsys.readouterr().err
    argv = ["run", "variational-binary-cl", "--set", "meta_values=-1", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "meta_values must be ≥ 0, got -1.0" in capsys.readouterr().err


def test_interrupted_hypernetwork_run_resumes_to_identical_numbers(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Growth and importance weights survive an interruption after the first experience."""
    sets = {"seeds": "1", "steps": "5", "n_tasks": "2", "scenarios": "split", "methods": "rnn-hnet-grow",
            "fisher_samples": "8"}
    _, reference = run_experiment("rnn-hypernetwork", profile="smoke", out=tmp_path / "ref", overrides=sets)
    original = RunContext.save_state

    def crash_after_first(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.saves == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("rnn-hypernetwork", profile="smoke", out=tmp_path / "cut", overrides=sets)
    monkeypatch.setattr(RunContext, "save_state", original)
    _, resumed = run_experiment("rnn-hypernetwork", profile="smoke", out=tmp_path / "cut", overrides=sets,
                                resume=True)
    assert resumed.records == reference.records


def test_parameter_matched_chunked_hypernet_has_at_least_the_lstm_budget() -> None:
    config = RnnHypernetConfig()
    lstm = count_parameters(make_hnet(config, "rnn-hnet", 8970))
    plain = count_parameters(make_hnet(config, "chunked-hnet", 8970))
    matched = make_hnet(config, "chunked-hnet-matched", 8970)
    width = matched.net[0].out_features
    narrower = ChunkedMLPHyperNet(8970, chunk_size=config.chunk_size, hidden=(width - 1,))
    assert plain < lstm <= count_parameters(matched) and count_parameters(narrower) < lstm
