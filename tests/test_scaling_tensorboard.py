"""--log tensorboard writes loss scalars, per-experience accuracies and the accuracy matrix image."""

import pytest

from weightlab.cli import main


def test_tensorboard_logging(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is installed by `make test`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    code = main(["run", "forgetting", "--profile", "smoke", "--set", "methods=finetune", "--set", "seeds=1",
                 "--out", str(out), "--log", "tensorboard", "--quiet"])
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "seed0/finetune/accuracy/task0", "seed0/finetune/average_accuracy"} <= scalars
    assert len(events.Scalars("seed0/finetune/accuracy/task0")) == 5  # one point per experience
    assert "seed0/finetune/accuracy_matrix" in events.Tags()["images"]


def test_unknown_logger(tmp_path, capsys):
    assert main(["run", "forgetting", "--log", "wandb", "--out", str(tmp_path / "x")]) == 2
    assert "unknown --log 'wandb'; expected one of tensorboard" in capsys.readouterr().err
