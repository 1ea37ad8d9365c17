"""The ``rnn-hypernetwork`` experiment: bad CLI values, resuming, the parameter-matched baseline (its smoke run:
tests/test_foundation_conformance.py)."""

from __future__ import annotations

import pytest

from weightlab.cli import main
from weightlab.experiments.base import run_experiment
from weightlab.experiments.rnn_hypernetwork import RnnHypernetConfig, make_hnet
from weightlab.methods.hypernet.hypernetworks import ChunkedMLPHyperNet, count_parameters
from weightlab.runs import RunContext


def test_bad_config_values_exit_with_status_2(tmp_path, capsys) -> None:
    assert main(["run", "rnn-hypernetwork", "--set", "scenarios=rotated", "--out", str(tmp_path / "b")]) == 2
    assert "scenarios: 'rotated' is not one of split, permuted" in capsys.readouterr().err
    assert main(["run", "rnn-hypernetwork", "--set", "n_tasks=3", "--out", str(tmp_path / "c")]) == 2
    assert "n_tasks must be ≥ 2 and divide the 10 classes, got 3" in capsys.readouterr().err


def test_interrupted_hypernetwork_run_resumes_to_identical_numbers(tmp_path, monkeypatch) -> None:
    """Growth and importance weights survive an interruption after the first experience."""
    sets = {"seeds": "1", "steps": "5", "n_tasks": "2", "scenarios": "split", "methods": "rnn-hnet-grow",
            "fisher_samples": "8"}
    _, reference = run_experiment("rnn-hypernetwork", profile="smoke", out=tmp_path / "ref", overrides=sets)
    original = RunContext.save_state

    def crash_after_first(self, *args, **kwargs):
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
