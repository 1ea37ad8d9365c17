"""The ``variational-binary-cl`` experiment through the CLI (its smoke run: tests/test_foundation_conformance.py)."""

from __future__ import annotations

import torch

from weightlab.cli import main


def test_bad_config_values_exit_with_status_2(tmp_path, capsys) -> None:
    assert main(["run", "variational-binary-cl", "--set", "methods=bogus", "--out", str(tmp_path / "a")]) == 2
    assert "methods: 'bogus' is not one of variational-task" in capsys.readouterr().err
    argv = ["run", "variational-binary-cl", "--set", "meta_values=-1", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "meta_values must be ≥ 0, got -1.0" in capsys.readouterr().err


SMALL = {"data": "digits", "image_size": 8, "n_train": 200, "n_val": 50, "n_test": 100, "augment_copies": 1,
         "epochs": 1, "n_tasks": 2, "hidden": 16}


def test_permuted_stream_permutes_each_affine_copy_like_its_original_and_keeps_validation_apart() -> None:
    from weightlab.experiments.variational_binary_cl import VariationalBinaryConfig, permuted_stream

    config = VariationalBinaryConfig(**SMALL)
    first, second = permuted_stream(config, 0)
    assert len(first.train) == 400 and len(first.val) == 50 and len(first.test) == 100
    flat0, flat1 = first.train.x.flatten(1), second.train.x.flatten(1)  # (400, 64)
    # one fixed pixel permutation maps task 0's images (originals and copies alike) onto task 1's
    match = torch.stack([torch.nonzero((flat1[:, j:j + 1] == flat0).all(0)).flatten()[:1] for j in range(64)])
    assert match.numel() == 64 and torch.equal(flat1, flat0[:, match.flatten()])
    assert not torch.equal(flat0[:200], flat0[200:])  # the copies are transformed
    assert torch.equal(first.train.y[:200], first.train.y[200:])
    train_rows = {tuple(r.tolist()) for r in flat0[:200]}
    assert not any(tuple(r.tolist()) in train_rows for r in first.val.x.flatten(1))


def test_the_variational_rule_keeps_one_adam_across_tasks_and_its_checkpoint_round_trips() -> None:
    from weightlab.experiments.variational_binary_cl import (
        Learner,
        OptimizerState,
        VariationalBinaryConfig,
        permuted_stream,
    )

    config = VariationalBinaryConfig(**SMALL)
    stream = permuted_stream(config, 0)
    torch.manual_seed(0)
    learner = Learner(config, "variational-task", {"lr": 0.01, "knob": 1e-3})
    steps_per_task = -(-len(stream[0].train) // config.batch_size)
    for i, exp in enumerate(stream):
        learner.learn(exp, i)
    field = learner.opt.layers[0].field
    assert learner.opt.state[field]["step"] == 2 * steps_per_task  # not reset at the task boundary
    assert learner.opt.state[field]["prior"] is not None  # consolidated after each task
    saved = OptimizerState(learner.opt).state_dict()
    fresh = Learner(config, "variational-task", {"lr": 0.01, "knob": 1e-3})
    OptimizerState(fresh.opt).load_state_dict(saved)
    restored = fresh.opt.state[fresh.opt.layers[0].field]
    assert restored["step"] == 2 * steps_per_task
    torch.testing.assert_close(restored["exp_avg"], learner.opt.state[field]["exp_avg"])
    torch.testing.assert_close(restored["prior"], learner.opt.state[field]["prior"])


def test_every_method_but_plain_binary_searches_two_lrs_times_three_knob_values() -> None:
    from weightlab.experiments.variational_binary_cl import METHODS, VariationalBinaryConfig, search_grid

    config = VariationalBinaryConfig()
    sizes = {m: len(search_grid(config, m)) for m in METHODS}
    assert sizes == {**{m: 6 for m in METHODS}, "binary": 2}
