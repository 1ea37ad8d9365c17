"""The experiment framework: a registered function that reproduces one paper claim.

    @experiment("forgetting", paper="foundation", config=ForgettingConfig, profiles={"smoke": {...}})
    def run(config: ForgettingConfig, ctx: RunContext) -> Results: ...

``quick`` is the config's defaults; ``smoke`` and ``full`` are overrides. :func:`run_experiment` resolves the
config, creates the run directory, runs, and writes ``config.yaml``, ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from weightlab import distributed, registry
from weightlab.errors import WeightlabError
from weightlab.report.tables import fmt, markdown_table
from weightlab.runs import RunContext
from weightlab.utils import replace_config
from weightlab.weights.io import write_text_atomic

PROFILES = ("smoke", "quick", "full")


@dataclass
class Claim:
    """A paper's claim in one sentence, what this run measured, and whether the direction held."""

    text: str
    measured: dict[str, Any]
    held: bool
    paper: str = ""


@dataclass
class Results:
    """What an experiment returns: named tables (rows of dicts), claims, extra JSON data and notes."""

    tables: dict[str, list[dict[str, Any]]]
    claims: list[Claim]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tables": self.tables, "claims": [dataclasses.asdict(c) for c in self.claims],
                "data": self.data, "notes": self.notes}

    def to_markdown(self, title: str) -> str:
        parts = [f"# {title}\n"]
        parts.append("## Claims\n")
        parts.append(markdown_table(claim_rows(self.claims)))
        for name, rows in self.tables.items():
            parts.append(f"\n## {name}\n")
            parts.append(markdown_table(rows))
        if self.notes:
            parts.append("\n## Notes\n")
            parts.append("".join(f"- {n}\n" for n in self.notes))
        return "\n".join(parts)


def claim_rows(claims: list[Claim]) -> list[dict[str, Any]]:
    return [{"claim": c.text, "measured": ", ".join(f"{k} = {fmt(v)}" for k, v in c.measured.items()),
             "paper": c.paper, "held": "✅ yes" if c.held else "❌ no"} for c in claims]


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    paper: str
    summary: str
    config: type
    profiles: dict[str, dict[str, Any]]
    fn: Callable[[Any, RunContext], Results]

    def resolve(self, profile: str = "quick", *, seed: int | None = None,
                overrides: dict[str, str] | None = None) -> Any:
        """The config for ``profile`` with ``seed`` and string ``overrides`` applied (types checked)."""
        if profile not in PROFILES:
            raise WeightlabError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        config = dataclasses.replace(self.config(), **self.profiles.get(profile, {}))
        if seed is not None:
            config = dataclasses.replace(config, seed=seed)
        return replace_config(config, overrides or {})


def experiment(name: str, *, paper: str, summary: str, config: type,
               profiles: dict[str, dict[str, Any]] | None = None) -> Callable:
    """Register an experiment function under ``name`` (its config dataclass needs a ``seed`` field)."""
    if "seed" not in {f.name for f in dataclasses.fields(config)}:
        raise TypeError(f"experiment {name!r}: {config.__name__} needs a 'seed' field")

    def deco(fn: Callable[[Any, RunContext], Results]) -> Callable[[Any, RunContext], Results]:
        registry.register("experiment", name)(ExperimentSpec(name, paper, summary, config, profiles or {}, fn))
        return fn

    return deco


def get(name: str) -> ExperimentSpec:
    return registry.get("experiment", name)


def default_dir(name: str, profile: str, seed: int, root: Path = Path("runs")) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / name / f"{profile}-seed{seed}-{stamp}"


def latest_unfinished(name: str, profile: str, seed: int, root: Path = Path("runs")) -> Path | None:
    cands = sorted((root / name).glob(f"{profile}-seed{seed}-*"))
    cands = [c for c in cands if not (c / "results.json").is_file()]
    return cands[-1] if cands else None


def config_record(spec: ExperimentSpec, config: Any, profile: str) -> dict[str, Any]:
    import torch

    from weightlab import __version__

    return {"experiment": spec.name, "paper": spec.paper, "profile": profile,
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
            "versions": {"weightlab": __version__, "torch": str(torch.__version__)}}


def run_experiment(name: str, *, profile: str = "quick", seed: int | None = None, out: Path | None = None,
                   overrides: dict[str, str] | None = None, resume: bool = False,
                   root: Path = Path("runs"), log: str | None = None) -> tuple[Path, Results]:
    """Resolve, run and record one experiment; returns the run directory and the results.

    ``log="tensorboard"`` also writes TensorBoard event files under ``<run dir>/tensorboard``.
    """
    from weightlab.report.tensorboard import LOGGERS, make_logger
    from weightlab.train.loop import default_callbacks

    if log is not None and log not in LOGGERS:
        raise WeightlabError(f"unknown --log {log!r}; expected one of {', '.join(LOGGERS)}")
    spec = get(name)
    config = spec.resolve(profile, seed=seed, overrides=overrides)
    if out is None:
        out = latest_unfinished(name, profile, config.seed, root) if resume else None
        if out is None and resume:
            raise WeightlabError(f"--resume: no unfinished run of {name!r} ({profile}, seed {config.seed}) "
                                 f"under {str(root / name)!r}; pass --out RUN_DIR")
        out = out or default_dir(name, profile, config.seed, root)
    out = Path(distributed.broadcast(str(out)))  # under torchrun every rank uses rank 0's folder
    record = config_record(spec, config, profile)
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise WeightlabError(f"--resume: {str(out)!r} holds no config.yaml, so there is no run to resume")
        previous = yaml.safe_load(saved.read_text())
        if previous.get("config") != record["config"]:
            diff = sorted(k for k in record["config"] if previous.get("config", {}).get(k) != record["config"][k])
            raise WeightlabError(f"--resume: the config differs from the interrupted run's in {', '.join(diff)}")
    elif out.exists():
        raise WeightlabError(f"output folder {str(out)!r} already exists; pass --resume to continue it "
                             "or choose another --out")
    distributed.barrier()  # every rank has checked the folder before rank 0 creates it
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    ctx = RunContext(out)  # resuming needs no flag: finished state in checkpoints/ is simply reused
    ctx.logger = make_logger(log, out) if main else None
    try:
        with default_callbacks(*([ctx.logger] if ctx.logger else [])):
            results = spec.fn(config, ctx)
    finally:
        if ctx.logger is not None:
            ctx.logger.close()
    if main:
        write_text_atomic(out / "results.json", json.dumps(results.to_json(), indent=2, default=_json_default))
        write_text_atomic(out / "results.md", results.to_markdown(f"{name} ({profile}, seed {config.seed})"))
    distributed.barrier()
    return out, results


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
