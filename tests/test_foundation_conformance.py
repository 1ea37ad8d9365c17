"""Every registered experiment runs its smoke profile and writes a complete run directory: claims with a
verdict and the effect that decides it, provenance, every seed's record, plots."""

import json

import pytest
import yaml

from weightlab import registry
from weightlab.experiments.base import PROFILES, run_experiment


@pytest.mark.parametrize("name", registry.names("experiment"))
def test_experiment_smoke_run_writes_its_folder(name, tmp_path):
    spec = registry.get("experiment", name)
    assert set(spec.profiles) <= set(PROFILES)
    out, results = run_experiment(name, profile="smoke", out=tmp_path / name)
    record = yaml.safe_load((out / "config.yaml").read_text())
    assert record["experiment"] == name and record["profile"] == "smoke"
    data = json.loads((out / "results.json").read_text())
    assert data["claims"], "an experiment must state at least one claim"
    for claim in data["claims"]:
        assert claim["text"] and claim["measured"] and isinstance(claim["held"], bool)
        assert claim["verdict"] in ("held", "not held", "inconclusive")
        assert claim["held"] == (claim["verdict"] == "held")
        effect = claim["effect"]
        assert effect["quantity"] and 0 <= effect["n"] <= len(data["seeds"])  # a seed whose value is NaN is left out
        assert len(effect["ci95"]) == 2 and effect["claimed"].split()[0] in (">", ">=", "<", "<=")
    first, count = record["config"]["seed"], record["config"]["seeds"]
    assert data["seeds"] == list(range(first, first + count))
    assert list(data["records"]) == [str(s) for s in data["seeds"]]
    prov = data["provenance"]
    assert {"weightlab", "torch", "python", "git_commit", "device", "threads", "data"} <= set(prov)
    assert ("data" in record["config"]) == (prov["data"]["name"] != "generated")
    assert results.tables and "## Claims" in (out / "results.md").read_text()
    assert list((out / "plots").glob("*.png")), "an experiment writes at least one plot"
