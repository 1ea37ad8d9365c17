"""Read and check the run and sweep folders under a directory, for the HTML report and the results page.

Everything in a run folder is untrusted input: a malformed ``results.json``, ``config.yaml`` or
``sweep.json`` is a :class:`FormatError` naming the file (the CLI: one line, exit 2), raised before the
report writes anything. The report escapes every value read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightlab.errors import FormatError, WeightlabError


@dataclass(frozen=True)
class RunRecord:
    """A finished run folder: its results, config, plots and where it lies under the runs directory."""

    path: Path
    rel: str
    experiment: str
    profile: str
    seeds: list[int]
    results: dict[str, Any]
    config: dict[str, Any]
    plots: list[Path]

    @property
    def smoke(self) -> bool:
        return self.profile == "smoke"


@dataclass(frozen=True)
class SweepRecord:
    path: Path
    rel: str
    info: dict[str, Any]
    plots: list[Path]


def collect(runs_dir: Path) -> tuple[list[RunRecord], list[SweepRecord]]:
    """Every finished run (``results.json``) and sweep (``sweep.json``) under ``runs_dir``, checked."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise WeightlabError(f"{str(runs_dir)!r} is not a folder of runs")
    runs = [_run(p.parent, runs_dir) for p in sorted(runs_dir.rglob("results.json"))]
    sweeps = [_sweep(p.parent, runs_dir) for p in sorted(runs_dir.rglob("sweep.json"))]
    if not runs and not sweeps:
        raise WeightlabError(f"no finished runs (results.json) or sweeps (sweep.json) under {str(runs_dir)!r}")
    return runs, sweeps


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return path.name if rel == "." else rel


def _plots(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "plots").glob("*.png") if p.is_file() and not p.is_symlink())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FormatError(f"{str(path)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _expect(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise FormatError(f"{str(path)!r} is not a weightlab results file: {what}")


def _run(folder: Path, root: Path) -> RunRecord:
    path = folder / "results.json"
    results = _read_json(path)
    _expect(isinstance(results, dict), path, "expected a JSON object")
    claims = results.get("claims")
    _expect(isinstance(claims, list) and all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                             for c in claims), path, "'claims' must be a list of objects with 'text'")
    for c in claims:
        _expect(isinstance(c.get("measured", {}), dict), path, "a claim's 'measured' must be an object")
        _expect(c.get("effect") is None or isinstance(c["effect"], dict), path, "a claim's 'effect' must be an object")
    tables = results.get("tables", {})
    _expect(isinstance(tables, dict) and all(isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
                                             for rows in tables.values()), path,
            "'tables' must map names to lists of rows (objects)")
    _expect(isinstance(results.get("notes", []), list), path, "'notes' must be a list")
    _expect(isinstance(results.get("provenance", {}), dict), path, "'provenance' must be an object")
    config = _config(folder / "config.yaml")
    seeds = results.get("seeds")
    if not (isinstance(seeds, list) and all(isinstance(s, int) for s in seeds)):
        fields = config.get("config", {}) if isinstance(config.get("config"), dict) else {}
        first, count = fields.get("seed", 0), fields.get("seeds", 1)
        seeds = list(range(first, first + count)) if isinstance(first, int) and isinstance(count, int) else []
    return RunRecord(folder, _rel(folder, root), str(config.get("experiment", folder.parent.name)),
                     str(config.get("profile", "")), seeds, results, config, _plots(folder))


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FormatError(f"{str(path)!r} is not valid YAML ({type(exc).__name__})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise FormatError(f"{str(path)!r} is not a weightlab config: expected a mapping")
    return config


def _sweep(folder: Path, root: Path) -> SweepRecord:
    path = folder / "sweep.json"
    info = _read_json(path)
    _expect(isinstance(info, dict), path, "expected a JSON object")
    _expect(isinstance(info.get("cells"), list) and all(isinstance(c, dict) for c in info["cells"]), path,
            "'cells' must be a list of objects")
    _expect(isinstance(info.get("aggregate", []), list) and all(isinstance(r, dict) for r in info.get("aggregate", [])),
            path, "'aggregate' must be a list of rows (objects)")
    return SweepRecord(folder, _rel(folder, root), info, _plots(folder))
