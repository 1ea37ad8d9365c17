"""The ``rnn-hypernetwork`` experiment: bad CLI values, resuming, hypernetworks sized to a compression ratio
(its smoke run: tests/test_foundation_conformance.py)."""

from __future__ import annotations

import pytest

from weightlab.cli import main
from weightlab.errors import WeightlabError
from weightlab.experiments.base import run_experiment
from weightlab.experiments.rnn_hypernetwork import RnnHypernetConfig, make_hnet, method_names
from weightlab.methods.hypernet.hypernetworks import ChunkedMLPHyperNet, LSTMHyperNet, count_parameters
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


@pytest.mark.parametrize("method", ["rnn-hnet", "chunked-hnet"])
@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_hypernetwork_is_the_widest_within_its_compression_ratio(method: str, ratio: float) -> None:
    config = RnnHypernetConfig()
    n_target = 16898  # the quick target MLP 196-64-64-2
    hnet = make_hnet(config, method, n_target, ratio)
    width = hnet.lstm.hidden_size if method == "rnn-hnet" else hnet.net[0].out_features
    common = {"chunk_size": config.chunk_size, "emb_dim": config.emb_dim, "chunk_emb_dim": config.chunk_emb_dim}
    wider = (LSTMHyperNet(n_target, hidden=width + 1, **common) if method == "rnn-hnet"
             else ChunkedMLPHyperNet(n_target, hidden=(width + 1,), **common))
    embeddings = config.n_tasks * config.emb_dim
    assert count_parameters(hnet) + embeddings <= ratio * n_target < count_parameters(wider) + embeddings
    with pytest.raises(WeightlabError, match="ratio 0.001: even one hidden unit gives"):
        make_hnet(config, method, n_target, 0.001)


def test_method_names_put_every_hypernetwork_at_every_ratio() -> None:
    config = RnnHypernetConfig(methods=("rnn-hnet", "ewc"), ratios=(0.1, 0.3))
    assert method_names(config) == ["rnn-hnet@0.1", "rnn-hnet@0.3", "ewc"]
