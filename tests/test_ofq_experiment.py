"""The ``ofq`` experiment through the CLI (smoke profile: seed 0, digits, one TinyViT block, W2A2), its bad
input, and the properties of the redesigned comparison: every arm runs the same steps, oscillation is counted
in the same final window, CGA freezes most weights so its last phase changes fewer codes than the same steps
without it, and iterative freezing froze some LSQ weights. The verdicts need the quick profile's seeds."""

from __future__ import annotations

import json

from weightlab.cli import main


def test_smoke_profile_runs_the_equal_budget_arms(tmp_path) -> None:
    out = tmp_path / "ofq"
    assert main(["run", "ofq", "--profile", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    main_table, per_module, teacher = results["tables"].values()
    assert [r["method"] for r in main_table] == ["full precision (teacher)", "LSQ", "LSQ + iterative freezing",
                                                 "StatsQ + QKR", "StatsQ + QKR + CGA",
                                                 "StatsQ + QKR + CGA, OFQ act."]
    assert len(results["claims"]) == 5 and all(isinstance(c["held"], bool) for c in results["claims"])
    assert "OFQ's activation quantizer" in results["claims"][-1]["text"]
    config = results["records"]["0"]
    runs = config["runs"]
    assert {r["steps"] for r in runs.values()} == {60 + 40}  # the same budget for every arm
    assert {r["window_steps"] for r in runs.values()} == {20}  # and the same final window
    ours, control, act = runs["w2/statsq+qkr+cga"], runs["w2/statsq+qkr"], runs["w2/statsq+qkr+cga+act"]
    assert act["final_loss"] != ours["final_loss"] and 0 < act["trainable"] < 0.05  # its own first phase
    assert act["act_step_spread"] > 1 and act["act_shift_steps"] > 0  # steps differ per token, shifts moved
    assert "act_step_spread" not in ours
    assert 0 < ours["trainable"] < 0.05  # CGA kept few weights trainable ...
    assert ours["phase2_change_rate"] < control["phase2_change_rate"]  # ... so fewer codes moved
    assert ours["per_module"]["attn.v"] <= control["per_module"]["attn.v"]  # v is frozen by CGA, W_qk is not
    assert set(ours["per_module"]) == {"attn.qk", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert set(runs["w2/lsq"]["per_module"]) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert 0 < runs["w2/lsq+freezing"]["frozen"] < 0.5
    assert 0 < config["fp"]["val_acc"] <= 1 and len(config["fp"]["loss_curve"]) == 20
    assert config["fp"]["loss_curve"][-1] < config["fp"]["loss_curve"][0]
    assert per_module[0]["W_qk"] == "–" and per_module[-1]["qkv"] == "–" and len(teacher) == 1
    assert (out / "plots" / "oscillation_w2.png").is_file() and (out / "plots" / "fp_loss.png").is_file()
    assert results["provenance"]["data"]["name"] == "digits"


def test_quick_profile_runs_on_fashion_mnist(capsys) -> None:
    assert main(["run", "ofq", "--profile", "quick", "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "fashion-mnist" in shown and "cga_steps" in shown


def test_cli_rejects_bad_bits_methods_and_window(tmp_path, capsys) -> None:
    assert main(["run", "ofq", "--profile", "smoke", "--set", "bits=9", "--out", str(tmp_path / "a")]) == 2
    assert "bits must be in [2, 8], got 9" in capsys.readouterr().err
    bad_method = ["--set", "methods=lsq,pact", "--out", str(tmp_path / "b")]
    assert main(["run", "ofq", "--profile", "smoke", *bad_method]) == 2
    assert "methods: 'pact' is not one of lsq" in capsys.readouterr().err
    assert main(["run", "ofq", "--profile", "smoke", "--set", "osc_window=41", "--out", str(tmp_path / "c")]) == 2
    assert "osc_window (41) must be ≤ cga_steps (40)" in capsys.readouterr().err
    plain = ["--set", "act_granularity=tensor", "--set", "act_shift=false", "--out", str(tmp_path / "d")]
    assert main(["run", "ofq", "--profile", "smoke", *plain]) == 2
    assert "the '+act' arms need act_granularity='token' or act_shift=true" in capsys.readouterr().err
