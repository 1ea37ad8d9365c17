"""End to end: the smoke profile through the CLI, the direction of the paper's claims, and config errors."""

from __future__ import annotations

import json

import pytest

from weightlab.cli import main
from weightlab.errors import WeightlabError
from weightlab.experiments.universality import UniversalityConfig


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("universality") / "run"
    assert main(["run", "universality", "--profile", "smoke", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "regret_complex.png", "regret_continuous.png", "regret_simple.png", "sgld_vs_exact.png"]
    return json.loads((out / "results.json").read_text())


def test_smoke_claims_hold_in_direction(smoke: dict) -> None:
    claims = {c["text"].split(" (")[0]: c for c in smoke["claims"]}
    assert len(claims) == 4 and all(c["direction"] for c in smoke["claims"]), smoke["claims"]  # one seed
    finite = smoke["records"]["0"]["finite"]
    # regret grows far less than the class size: +4.4 nats of log size, well under 1 nat of regret
    simple1, simple2 = finite["simple/1"], finite["simple/2"]
    assert simple2["log_size"] - simple1["log_size"] == pytest.approx(4.394, abs=1e-3)
    assert abs(simple2["regret_mean"][-1] - simple1["regret_mean"][-1]) < 1.0
    # the pathwise bound: no sequence's regret exceeds log 1/W(A_0) of the teacher's function
    for entry in finite.values():
        assert entry["regret_max"] <= entry["log_inv_weight_0"] + 1e-9
        assert entry["log_inv_weight_0"] < entry["log_inv_prior_teacher"] + 1e-12
    # the SGLD ensemble's distance to the exact mixture shrinks with chains
    methods = smoke["records"]["0"]["continuous"]["methods"]
    assert methods["SGLD ensemble K=16"]["kl"] < methods["SGLD ensemble K=1"]["kl"]


def test_bad_config_values_are_rejected(tmp_path) -> None:
    with pytest.raises(WeightlabError, match=r"hidden_sizes must be in \[1, 5\], got 7"):
        UniversalityConfig(hidden_sizes=(7,))
    with pytest.raises(WeightlabError, match="chains must be ≥ 1, got 0"):
        UniversalityConfig(chains=(0, 4))
    with pytest.raises(WeightlabError, match="grid must be ≥ 1"):
        UniversalityConfig(grid=0)
    code = main(["run", "universality", "--profile", "smoke", "--out", str(tmp_path / "x"),
                 "--set", "hidden_sizes=9"])
    assert code == 2
