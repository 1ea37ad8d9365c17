"""Sweeps: a grid of config values × seeds, each cell an ordinary run directory.

    weightlab sweep forgetting --grid lr=0.01,0.05 --seeds 2 --profile smoke --workers 2
    weightlab sweep forgetting --grid lr=0.01,0.05 --seeds 2 --ray auto        # Ray tasks (optional extra)

Cells run in parallel local worker processes (default) or as Ray tasks on a Ray cluster. Re-running a sweep
with the same ``--out`` skips finished cells and resumes unfinished ones; a failing cell is reported and does
not stop the others. The sweep folder holds ``sweep.json``, ``sweep.md`` (mean ± std over seeds per grid
point of every figure the claims measured, and each claim's verdict over the point's seeds, judged as one run
of that many seeds would be) and ``plots/<key>.png`` per swept key.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import itertools
import json
import multiprocessing
import re
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightlab.errors import WeightlabError
from weightlab.report.tables import fmt, markdown_table, mean_std
from weightlab.weights.io import write_text_atomic


@dataclass(frozen=True)
class Cell:
    """One grid point at one seed."""

    params: tuple[tuple[str, str], ...]
    seed: int

    @property
    def name(self) -> str:
        parts = [f"{k}={v}" for k, v in self.params] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", ",".join(parts))

    @property
    def point(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params) or "(defaults)"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["lr=0.01,0.05", "epochs=1,2"]`` → ``{"lr": ["0.01", "0.05"], "epochs": ["1", "2"]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise WeightlabError(f"--grid expects key=v1,v2,..., got {item!r}")
        grid[key.strip()] = vals
    return grid


def make_cells(grid: dict[str, list[str]], *, seeds: int, base_seed: int = 0) -> list[Cell]:
    if seeds < 1:
        raise WeightlabError(f"--seeds must be ≥ 1, got {seeds}")
    keys = list(grid)
    return [Cell(tuple(zip(keys, combo)), base_seed + s)
            for combo in itertools.product(*(grid[k] for k in keys)) for s in range(seeds)]


def _overrides(spec: Any, cell: Cell) -> dict[str, str]:
    over = dict(cell.params)
    if "seeds" in {f.name for f in dataclasses.fields(spec.config)}:
        over["seeds"] = "1"  # one seed per cell: the sweep owns the seeds
    return over


def run_cell(experiment: str, profile: str, cell: Cell, root: str, log: str | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one cell; never raises — failures are returned."""
    from weightlab.experiments.base import get, run_experiment

    out = Path(root) / cell.name
    record: dict[str, Any] = {"cell": cell.name, "point": cell.point, "params": dict(cell.params),
                              "seed": cell.seed}
    try:
        if (out / "results.json").is_file():
            results = json.loads((out / "results.json").read_text())
            return {**record, "status": "skipped (finished)", "claims": results["claims"]}
        overrides = _overrides(get(experiment), cell)
        _, results = run_experiment(experiment, profile=profile, seed=cell.seed, out=out, overrides=overrides,
                                    resume=(out / "config.yaml").is_file(), log=log)
        return {**record, "status": "ok", "claims": results.to_json()["claims"]}
    except Exception as exc:  # a failing cell is reported, the others go on (Ctrl-C still stops)
        return {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5)}


def _check_ray_address(address: str, timeout: float = 5.0) -> None:
    if address in {"auto", "local"}:
        return
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise WeightlabError(f"cannot reach the Ray cluster at {address!r} within {timeout:.0f} s ({exc}); "
                             "expected host:port of a running Ray head, or 'auto' for a local instance") from None


def _run_ray(experiment: str, profile: str, cells: list[Cell], root: str, address: str, workers: int,
             log: str | None) -> list[dict[str, Any]]:
    try:
        import ray
    except ModuleNotFoundError:
        raise WeightlabError("--ray needs the optional extra: pip install 'weightlab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address in {"auto", "local"}:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(run_cell)
        return ray.get([task.remote(experiment, profile, c, root, log) for c in cells])
    finally:
        if started:
            ray.shutdown()


def run_sweep(experiment: str, grid: dict[str, list[str]], *, seeds: int = 1, profile: str = "quick",
              workers: int = 2, ray_address: str | None = None, out: Path | None = None, base_seed: int = 0,
              log: str | None = None, root: Path = Path("runs")) -> tuple[Path, list[dict[str, Any]]]:
    """Run every cell of ``grid`` × ``seeds``; returns the sweep folder and the aggregate rows."""
    from weightlab.experiments.base import get
    from weightlab.report.tensorboard import LOGGERS

    if log is not None and log not in LOGGERS:  # every cell would fail: refuse before the first one
        raise WeightlabError(f"unknown --log {log!r}; expected one of {', '.join(LOGGERS)}")
    spec = get(experiment)
    valid = sorted(f.name for f in dataclasses.fields(spec.config) if f.name not in {"seed", "seeds"})
    for key in grid:
        if key not in valid:
            raise WeightlabError(f"unknown --grid key {key!r} for {experiment}; valid keys: {', '.join(valid)}")
    cells = make_cells(grid, seeds=seeds, base_seed=base_seed)
    for cell in cells:  # type-check every value before anything runs
        spec.resolve(profile, seed=cell.seed, overrides=_overrides(spec, cell))
    if workers < 1:
        raise WeightlabError(f"--workers must be ≥ 1, got {workers}")
    if ray_address:
        _check_ray_address(ray_address)  # fail fast, before any folder is written
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out is not None else root / "sweeps" / f"{experiment}-{profile}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    if ray_address:
        records = _run_ray(experiment, profile, cells, str(out), ray_address, workers, log)
    elif workers == 1:
        records = [run_cell(experiment, profile, c, str(out), log) for c in cells]
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            records = list(pool.map(run_cell, *zip(*[(experiment, profile, c, str(out), log) for c in cells])))
    rows = aggregate(records)
    write_text_atomic(out / "sweep.json", json.dumps({
        "experiment": experiment, "profile": profile, "grid": grid, "seeds": seeds, "cells": records,
        "aggregate": rows}, indent=2))
    failed = [r for r in records if r["status"] == "failed"]
    md = [f"# Sweep of {experiment} ({profile}, {seeds} seed(s) per point)\n", markdown_table(rows)]
    if failed:
        md.append("\n## Failed cells\n")
        md += [f"- `{r['cell']}`: {r['error']}\n" for r in failed]
    write_text_atomic(out / "sweep.md", "\n".join(md))
    _plots(out, grid, records)
    return out, rows


def _measured(record: dict[str, Any]) -> dict[str, float]:
    values = {}
    for claim in record.get("claims", []):
        for k, v in claim["measured"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[k] = float(v)
    return values


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point: how many seeds finished, mean ± std of every measured figure, and each claim's
    verdict over the point's seeds (each cell is one seed; :func:`pooled_verdict`)."""
    rows = []
    points = list(dict.fromkeys(r["point"] for r in records))
    for point in points:
        done = [r for r in records if r["point"] == point and r["status"] != "failed"]
        row: dict[str, Any] = {"grid point": point, "seeds": f"{len(done)}/"
                               f"{sum(r['point'] == point for r in records)}"}
        keys = list(dict.fromkeys(k for r in done for k in _measured(r)))
        for k in keys:
            vals = [_measured(r)[k] for r in done if k in _measured(r)]
            m, s = mean_std(vals)
            row[k] = fmt(m) if len(vals) == 1 else f"{fmt(m)} ± {fmt(s)}"  # one seed has no spread
        n_claims = min((len(r["claims"]) for r in done), default=0)
        for i in range(n_claims):
            row[f"claim {i + 1}"] = pooled_verdict([r["claims"][i] for r in done])
        rows.append(row)
    return rows


def pooled_verdict(claims: list[dict[str, Any]]) -> str:
    """The verdict of one claim over the seeds of a grid point: each part's per-seed values (one cell, one
    seed: the part's mean) judged as a run of that many seeds would judge them (``"–"`` when the cells do not
    carry their parts)."""
    from weightlab.stats import combine, effect

    parts = [c.get("parts") or ([c["effect"]] if isinstance(c.get("effect"), dict) else None) for c in claims]
    if any(p is None or "parts_verdicts" in c for p, c in zip(parts, claims, strict=True)) or \
            len({len(p) for p in parts}) != 1:
        return "–"
    effects = []
    for j, first in enumerate(parts[0]):
        side, _, threshold = str(first.get("claimed", "> 0")).partition(" ")
        values = [p[j].get("mean") for p in parts]
        effects.append(effect(str(first.get("quantity", "")), [v for v in values if v is not None], side=side,
                              threshold=float(threshold or 0)))
    return f"{combine(e.verdict for e in effects)} (n = {min(e.n for e in effects)})"


def _plots(out: Path, grid: dict[str, list[str]], records: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    from weightlab.report import plots  # noqa: F401 - selects the Agg backend

    ok = [r for r in records if r["status"] != "failed"]
    metrics = list(dict.fromkeys(k for r in ok for k in _measured(r)))[:6]
    if not ok or not metrics:
        return
    (out / "plots").mkdir(exist_ok=True)
    for key, values in grid.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for metric in metrics:
            means, stds = [], []
            for v in values:
                vals = [_measured(r)[metric] for r in ok if r["params"].get(key) == v and metric in _measured(r)]
                m, s = mean_std(vals)
                means.append(m)
                stds.append(s)
            ax.errorbar(range(len(values)), means, yerr=stds, marker="o", capsize=3, label=metric)
        ax.set(xticks=range(len(values)), xticklabels=values, xlabel=key, ylabel="measured (mean ± std)",
               title=f"sweep over {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.savefig(out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
