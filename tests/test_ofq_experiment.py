"""The ``ofq`` experiment through the CLI (smoke profile), its bad input, and the claim's direction.

The smoke profile (seed 0, one TinyViT block, 80 QAT steps at W2A2) is also the seeded end-to-end test of the
paper's direction: StatsQ + QKR + CGA is more accurate than LSQ and has fewer oscillating weights at the end.
(It also records, without asserting, the two claims that do not hold at this scale.) The quick profile's
3-seed check of the accuracy claims is ``slow``.
"""

from __future__ import annotations

import json

import pytest

from weightlab.cli import main
from weightlab.experiments.base import run_experiment


def test_smoke_profile_runs_and_reports_the_paper_direction(tmp_path) -> None:
    out = tmp_path / "ofq"
    assert main(["run", "ofq", "--profile", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    (rows,) = results["tables"].values()
    assert [r["method"] for r in rows] == ["full precision", "LSQ", "StatsQ", "StatsQ + QKR",
                                           "StatsQ + QKR + low-LR steps (control)", "StatsQ + QKR + CGA"]
    assert len(results["claims"]) == 4 and all(isinstance(c["held"], bool) for c in results["claims"])
    run = results["records"]["0"]["runs"]["w2/statsq+qkr+cga"]
    assert 0 <= run["osc"] <= 1 and 0 < run["trainable"] < 0.1  # CGA kept few weights trainable
    assert (out / "plots" / "oscillation_w2.png").is_file()
    effect = {c["text"]: c["effect"] for c in results["claims"]}
    assert effect["at 2 bits StatsQ + QKR + CGA is more accurate than LSQ"]["mean"] > 0  # one seed: the direction
    # The oscillation claim is not asserted here: at smoke scale its direction changes with the number of
    # BLAS threads (it held with 1 thread, not with 2), and the quick run shows CGA's freezing is not what
    # lowers oscillation (see docs/quantization.md). The quick profile's claims are checked by the slow test.


def test_cli_rejects_bad_bits_and_methods(tmp_path, capsys) -> None:
    assert main(["run", "ofq", "--profile", "smoke", "--set", "bits=9", "--out", str(tmp_path / "a")]) == 2
    assert "bits must be in [2, 8], got 9" in capsys.readouterr().err
    bad_method = ["--set", "methods=lsq,pact", "--out", str(tmp_path / "b")]
    assert main(["run", "ofq", "--profile", "smoke", *bad_method]) == 2
    assert "methods: 'pact' is not one of lsq, statsq" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_profile_accuracy_claims(tmp_path) -> None:
    _, results = run_experiment("ofq", profile="quick", out=tmp_path / "quick")
    direction = {c.text: c.direction for c in results.claims}
    assert direction["at 2 bits StatsQ + QKR + CGA is more accurate than LSQ"]
    assert direction["the accuracy gap to LSQ is smaller at 3 bits than at 2 bits"]
