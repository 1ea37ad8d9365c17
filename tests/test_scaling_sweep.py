"""Sweeps: grid × seeds as run directories, resumable, failure-tolerant, locally and on a local Ray instance."""

import json

import pytest

from weightlab.cli import main
from weightlab.errors import WeightlabError
from weightlab.sweep import aggregate, make_cells, parse_grid, run_sweep

SMALL = {"methods": ["finetune"], "epochs": ["1"]}


def test_parse_grid_and_cells():
    grid = parse_grid(["lr=0.01,0.05", "epochs=1"])
    assert grid == {"lr": ["0.01", "0.05"], "epochs": ["1"]}
    cells = make_cells(grid, seeds=2, base_seed=3)
    assert [c.name for c in cells] == ["lr=0.01,epochs=1,seed=3", "lr=0.01,epochs=1,seed=4",
                                       "lr=0.05,epochs=1,seed=3", "lr=0.05,epochs=1,seed=4"]
    with pytest.raises(WeightlabError, match="key=v1,v2"):
        parse_grid(["lr"])


def test_aggregate_mean_std_and_pooled_verdict_known_answer():
    def rec(point, value, delta):
        effect = {"quantity": "Δ", "mean": delta, "ci95": [None, None], "n": 1, "claimed": "> 0.1"}
        return {"point": point, "status": "ok", "params": {},
                "claims": [{"measured": {"acc": value}, "held": False, "effect": effect}]}

    rows = aggregate([rec("a", 0.5, 0.2), rec("a", 0.7, 0.3), rec("a", 0.6, 0.25), rec("b", 1.0, 0.0),
                      {"point": "b", "status": "failed", "params": {}}])
    assert rows[0]["acc"] == "0.6 ± 0.1" and rows[0]["claim 1"] == "held (n = 3)"  # 0.25 ± 0.124 > 0.1
    assert rows[1]["seeds"] == "1/2" and rows[1]["acc"] == "1" and rows[1]["claim 1"] == "inconclusive (n = 1)"
    low = aggregate([rec("c", 0.5, 0.0), rec("c", 0.5, 0.01), rec("c", 0.5, 0.005)])
    assert low[0]["claim 1"] == "not held (n = 3)"  # interval [−0.007, 0.017], wholly below 0.1


def test_local_sweep_resumes_and_reports_failures(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = {"lr": ["0.02", "0.05"], **SMALL}
    _, rows = run_sweep("forgetting", grid, seeds=1, profile="smoke", workers=2, out=out)
    assert len(rows) == 2 and all(r["seeds"] == "1/1" for r in rows)
    for cell in ("lr=0.02,methods=finetune,epochs=1,seed=0", "lr=0.05,methods=finetune,epochs=1,seed=0"):
        assert (out / cell / "results.json").is_file()  # every cell is an ordinary run directory
    assert (out / "plots" / "lr.png").is_file() and (out / "sweep.md").is_file()

    # a re-run skips finished cells; a failing cell is reported and the others still run
    import weightlab.experiments.base as base

    real = base.run_experiment

    def flaky(name, **kw):
        if "lr=0.5" in str(kw["out"]):
            raise RuntimeError("boom")
        return real(name, **kw)

    monkeypatch.setattr(base, "run_experiment", flaky)
    _, rows = run_sweep("forgetting", {"lr": ["0.02", "0.05", "0.5"], **SMALL}, seeds=1, profile="smoke",
                        workers=1, out=out)
    info = json.loads((out / "sweep.json").read_text())
    status = {c["cell"].split(",")[0]: c["status"] for c in info["cells"]}
    assert status == {"lr=0.02": "skipped (finished)", "lr=0.05": "skipped (finished)", "lr=0.5": "failed"}
    assert "boom" in (out / "sweep.md").read_text()


def test_local_and_ray_sweeps_give_the_same_aggregate(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is installed by `make test`; install weightlab[ray]")
    grid = {"lr": ["0.02", "0.05"], **SMALL}
    _, local = run_sweep("forgetting", grid, seeds=1, profile="smoke", workers=1, out=tmp_path / "local")
    _, remote = run_sweep("forgetting", grid, seeds=1, profile="smoke", workers=2, ray_address="auto",
                          out=tmp_path / "ray")
    assert local == remote


def test_sweep_bad_input(capsys, tmp_path):
    assert main(["sweep", "forgetting", "--grid", "learning_rate=0.1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown --grid key 'learning_rate'" in err and "valid keys:" in err and "lr" in err
    assert main(["sweep", "forgetting", "--grid", "lr=0.1", "--ray", "127.0.0.1:1",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in err
    assert not (tmp_path / "b").exists()
    assert main(["sweep", "forgetting", "--grid", "epochs=x", "--out", str(tmp_path / "c")]) == 2
    assert "expected an int" in capsys.readouterr().err
