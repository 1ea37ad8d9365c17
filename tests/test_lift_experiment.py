"""Experiment ``lift``: the smoke profile end to end, the claim's direction at tiny scale, CLI errors."""

from __future__ import annotations

import json

from weightlab.cli import main
from weightlab.experiments.base import run_experiment
from weightlab.experiments.lift import (
    LiftExperimentConfig,
    fine_tune,
    pretrained,
    source_task,
    target_task,
)
from weightlab.runs import RunContext
from weightlab.train import accuracy


def test_lift_keeps_more_source_knowledge_than_full_fine_tuning(tmp_path) -> None:
    # seeded tiny version of the paper's claim: after fine-tuning on (a+b+c) mod 7, LIFT (8% of each matrix)
    # still solves the source tasks far better than full fine-tuning, and it has learned the target
    cfg = LiftExperimentConfig(modulus=7, dim=48, depth=2, pretrain_epochs=80, epochs=20, target_fraction=0.4,
                               lora_rank=2, filter_rank=2, refresh_every=30)
    base = pretrained(cfg, RunContext(tmp_path).trial(0))
    train_set, _, test = target_task(7, 0.4, seed=0)
    source = source_task(7)
    assert accuracy(base, source) > 0.9
    before = accuracy(base, test)
    full = fine_tune(cfg, base, "full", 3e-3, 0, train_set)
    lift = fine_tune(cfg, base, "lift", 1e-2, 0, train_set)
    assert accuracy(lift, source) > accuracy(full, source) + 0.1
    assert accuracy(lift, test) > before + 0.1
    assert accuracy(full, test) > before + 0.1


def test_smoke_profile_writes_every_method_and_the_claims(tmp_path) -> None:
    out, results = run_experiment("lift", profile="smoke", out=tmp_path / "run")
    table = next(iter(results.tables.values()))
    assert [r["method"] for r in table] == ["full", "lift", "lift_randomized", "magnitude", "random"]
    texts = [c.text for c in results.claims]
    assert any("magnitude" in t for t in texts) and any("randomized" in t for t in texts)
    saved = json.loads((out / "results.json").read_text())
    names = {f"blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(saved["data"]["mask_overlap"]) == names
    assert (out / "plots" / "target_vs_source.png").is_file()


def test_cli_rejects_bad_config_with_exit_status_2(tmp_path, capsys) -> None:
    smoke = ["run", "lift", "--profile", "smoke", "--out", str(tmp_path / "a"), "--set"]
    assert main([*smoke, "methods=lift,dora"]) == 2
    assert "methods: 'dora' is not one of full, lora" in capsys.readouterr().err
    assert main([*smoke, "filter_rank=64"]) == 2
    assert "filter_rank must be in [1, dim = 32], got 64" in capsys.readouterr().err
