"""The experiment contract: trial(config, seed, ctx) → record, summarise(config, records) → Results.

A toy experiment (registered for these tests only) exercises what the framework owns: the seed list,
per-seed records reused on resume, JSON units, checkpointed objects and streams, seeding by key, claims
with verdicts and intervals, figures, provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from weightlab import registry
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment, run_experiment
from weightlab.experiments.configs import Count, ExperimentConfig
from weightlab.experiments.results import Results, claim
from weightlab.report import plots
from weightlab.runs import RunContext, TrialContext
from weightlab.stats import paired

CALLS: list[tuple[str, int]] = []


@dataclass(frozen=True)
class ToyConfig(ExperimentConfig):
    seeds: Count = 4
    steps: Count = 3
    arm: Literal["good", "bad"] = "good"


class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(()))


def toy_trial(config: ToyConfig, seed: int, ctx: TrialContext) -> dict:
    CALLS.append(("trial", seed))
    noise = ctx.cached("noise", lambda: torch.rand(()).item())  # seeded from (seed, "noise")
    base = Counter()
    fit = ctx.fitted("base", {"counter": base}, lambda: {"fitted": base.total.add_(seed).item()})
    shared = ctx.for_seed(config.seed).cached("choice", lambda: seed)  # made once, by the first seed

    def step(i: int, step_seed: int) -> dict:
        CALLS.append(("step", seed))
        base.total.add_(1)
        return {"i": i, "draw": torch.rand(()).item(), "seed": step_seed}

    rows = ctx.stream("walk", config.steps, step, {"counter": base})
    gain = 0.1 if config.arm == "good" else -0.1
    return {"method": noise + gain, "baseline": noise, "fit": fit, "shared": shared, "rows": rows,
            "total": base.total.item()}


def toy_summarise(config: ToyConfig, records: list[dict]) -> Results:
    method, baseline = [r["method"] for r in records], [r["baseline"] for r in records]
    return Results(tables={"toy": [{"seed": s, "method": m} for s, m in zip(config.seed_list, method, strict=True)]},
                   claims=[claim("the method beats the baseline", paired("method − baseline", method, baseline),
                                 paper="+0.1")],
                   figures={"curve": plots.curves({"method": method}, title="t", xlabel="seed", ylabel="y")})


@pytest.fixture(autouse=True)
def toy():
    spec = experiment("toy-contract", paper="toy", summary="a toy", config=ToyConfig, trial=toy_trial,
                      summarise=toy_summarise, profiles={"smoke": {"seeds": 2}})
    CALLS.clear()
    yield spec
    registry._REGISTRY["experiment"].pop("toy-contract")


def test_a_run_writes_claims_with_verdict_interval_and_provenance(tmp_path) -> None:
    out, results = run_experiment("toy-contract", out=tmp_path / "run")
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1, 2, 3] and list(data["records"]) == ["0", "1", "2", "3"]
    (c,) = data["claims"]
    assert c["verdict"] == "held" and c["held"] is True and c["paper"] == "+0.1"
    assert c["effect"]["n"] == 4 and c["effect"]["mean"] == pytest.approx(0.1)
    assert c["effect"]["ci95"][0] == pytest.approx(0.1) and c["effect"]["claimed"] == "> 0"
    prov = data["provenance"]
    assert {"weightlab", "torch", "python", "git_commit", "device", "threads", "data"} <= set(prov)
    assert prov["data"]["name"] == "generated" and isinstance(prov["threads"], int)
    assert (out / "plots" / "curve.png").is_file() and (out / "trials" / "seed3.json").is_file()
    assert "seeds 0–3" in (out / "results.md").read_text()
    records = results.records
    assert [r["fit"]["fitted"] for r in records] == [0.0, 1.0, 2.0, 3.0]
    assert [r["total"] for r in records] == [3.0, 4.0, 5.0, 6.0]  # fitted state carried into the stream
    assert all(r["shared"] == 0 for r in records)  # the first seed's choice, reused by the others
    assert len({r["baseline"] for r in records}) == 4  # each seed its own draw


def test_not_held_and_single_seed_verdicts(tmp_path) -> None:
    _, bad = run_experiment("toy-contract", out=tmp_path / "bad", overrides={"arm": "bad"})
    assert bad.claims[0].verdict == "not held" and not bad.claims[0].held
    _, one = run_experiment("toy-contract", out=tmp_path / "one", overrides={"seeds": "1"})
    assert one.claims[0].verdict == "inconclusive" and one.claims[0].effect.ci95 is None


def test_units_are_seeded_by_key_whatever_ran_before(tmp_path) -> None:
    ctx = RunContext(tmp_path).trial(7)
    torch.rand(5)
    first = ctx.seeded("unit", 1), torch.rand(3)
    torch.rand(11)
    second = ctx.seeded("unit", 1), torch.rand(3)
    assert first[0] == second[0] and torch.equal(first[1], second[1])
    assert ctx.seeded("unit", 2) != first[0] and ctx.for_seed(8).seeded("unit", 1) != first[0]


def test_resume_reuses_finished_seeds_and_gives_identical_results(tmp_path, monkeypatch) -> None:
    run_experiment("toy-contract", out=tmp_path / "ref")
    original = RunContext.save_state

    def crash(self: RunContext, key: str, *args, **kwargs) -> None:
        if key == "seed2/walk/exp1":  # seeds 0 and 1 finished, seed 2 inside its stream
            raise KeyboardInterrupt
        original(self, key, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy-contract", out=tmp_path / "cut")
    monkeypatch.setattr(RunContext, "save_state", original)
    CALLS.clear()
    run_experiment("toy-contract", out=tmp_path / "cut", resume=True)
    assert [c for c in CALLS if c[0] == "trial"] == [("trial", 2), ("trial", 3)]  # 0 and 1 were read back
    assert CALLS.count(("step", 2)) == 2  # seed 2 restarted after its first checkpointed step
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert json.loads((tmp_path / "cut" / "results.json").read_text()) == ref


def test_a_trial_must_return_json(tmp_path, toy) -> None:
    registry._REGISTRY["experiment"].pop("toy-contract")
    experiment("toy-contract", paper="toy", summary="a toy", config=ToyConfig,
               trial=lambda config, seed, ctx: {"x": object()}, summarise=toy_summarise)
    with pytest.raises(TypeError, match="must be JSON-able; got a object"):
        run_experiment("toy-contract", out=tmp_path / "r", overrides={"seeds": "1"})


def test_registration_checks_the_config_and_profiles() -> None:
    @dataclass(frozen=True)
    class Plain:
        seed: int = 0

    with pytest.raises(TypeError, match="must subclass ExperimentConfig"):
        experiment("toy-plain", paper="p", summary="s", config=Plain, trial=toy_trial, summarise=toy_summarise)
    with pytest.raises(TypeError, match="quick is the defaults"):
        experiment("toy-quick", paper="p", summary="s", config=ToyConfig, trial=toy_trial,
                   summarise=toy_summarise, profiles={"quick": {}})
    with pytest.raises(WeightlabError, match="arm: 'ugly' is not one of good, bad"):
        ToyConfig(arm="ugly")


def test_provenance_comes_from_the_data_and_model_registries(monkeypatch) -> None:
    import gzip
    import hashlib

    import sklearn.datasets

    import weightlab.data.datasets as datasets
    from weightlab.experiments import provenance as prov
    from weightlab.experiments.forgetting import ForgettingConfig

    digits_file = sklearn.datasets.__file__.replace("__init__.py", "data/digits.csv.gz")
    with gzip.open(digits_file, "rb") as fh:  # hashes are of the decompressed content
        digest = hashlib.sha256(fh.read()).hexdigest()
    data = prov.provenance(ForgettingConfig())["data"]
    assert data["name"] == "digits" and data["sha256"] == digest and "digits.csv.gz" in data["source"]
    monkeypatch.setattr(datasets, "dataset_provenance", lambda name: {"name": name, "source": "pkg", "sha256": "ab"})
    assert prov.provenance(ForgettingConfig())["data"] == {"name": "digits", "source": "pkg", "sha256": "ab"}
    assert "model" not in prov.provenance(ForgettingConfig())
    with pytest.raises(WeightlabError, match="unknown pretrained 'nope'"):
        prov.model_provenance("nope")
