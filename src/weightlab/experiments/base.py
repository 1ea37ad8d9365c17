"""The experiment framework: two functions reproduce one paper claim, the framework does the rest.

    def trial(config: ForgettingConfig, seed: int, ctx: TrialContext) -> dict: ...      # one seed, JSON
    def summarise(config: ForgettingConfig, records: list[dict]) -> Results: ...       # tables, claims, plots

    experiment("forgetting", paper="foundation", summary="...", config=ForgettingConfig, trial=trial,
               summarise=summarise, profiles={"smoke": {...}, "full": {...}})

``quick`` is the config's defaults; ``smoke`` and ``full`` are overrides. :func:`run_experiment` resolves and
checks the config (before anything is written), creates the run directory, runs ``trial`` for every seed of
``config.seed_list`` (a finished seed's record is stored and reused on ``--resume``), calls ``summarise`` on
the records in seed order, and writes ``config.yaml``, ``results.json`` (with provenance) and ``results.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightlab import distributed, registry
from weightlab.errors import WeightlabError
from weightlab.experiments.configs import ExperimentConfig, replace_config
from weightlab.experiments.provenance import provenance
from weightlab.experiments.results import Claim, Results, claim, claim_rows
from weightlab.report.claims import seed_label
from weightlab.report.progress import track
from weightlab.runs import RunContext, TrialContext, roundtrip
from weightlab.utils import derive_seed, seed_everything
from weightlab.weights.io import write_text_atomic

PROFILES = ("smoke", "quick", "full")
Trial = Callable[[Any, int, TrialContext], dict[str, Any]]
Summarise = Callable[[Any, list[dict[str, Any]]], Results]

__all__ = ["PROFILES", "Claim", "ExperimentSpec", "Results", "claim", "claim_rows", "experiment", "get",
           "run_experiment"]


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    paper: str
    summary: str
    config: type
    profiles: dict[str, dict[str, Any]]
    trial: Trial
    summarise: Summarise

    def resolve(self, profile: str = "quick", *, seed: int | None = None,
                overrides: dict[str, str] | None = None) -> Any:
        """The config for ``profile`` with ``seed`` and string ``overrides`` applied, every field checked."""
        if profile not in PROFILES:
            raise WeightlabError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        config = dataclasses.replace(self.config(), **self.profiles.get(profile, {}))
        if seed is not None:
            config = dataclasses.replace(config, seed=seed)
        return replace_config(config, overrides or {})


def experiment(name: str, *, paper: str, summary: str, config: type, trial: Trial, summarise: Summarise,
               profiles: dict[str, dict[str, Any]] | None = None) -> ExperimentSpec:
    """Register the experiment ``name``: its config class (an :class:`ExperimentConfig`), ``trial`` and
    ``summarise``; returns the spec."""
    if not (isinstance(config, type) and issubclass(config, ExperimentConfig)):
        raise TypeError(f"experiment {name!r}: {config!r} must subclass ExperimentConfig")
    unknown = set(profiles or {}) - set(PROFILES)
    if unknown or "quick" in (profiles or {}):
        raise TypeError(f"experiment {name!r}: profiles are overrides for smoke and full (quick is the defaults)")
    spec = ExperimentSpec(name, paper, summary, config, profiles or {}, trial, summarise)
    registry.register("experiment", name)(spec)
    return spec


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
    """What ``config.yaml`` holds (and ``--dry-run`` prints): experiment, paper, profile, every field."""
    return {"experiment": spec.name, "paper": spec.paper, "profile": profile,
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str))}


def config_yaml(spec: ExperimentSpec, config: Any, profile: str) -> str:
    return yaml.safe_dump(config_record(spec, config, profile), sort_keys=False, allow_unicode=True)


def run_trials(spec: ExperimentSpec, config: Any, run: RunContext) -> list[dict[str, Any]]:
    """Every seed's record, in seed order: read from ``trials/seed<k>.json`` when that seed finished
    before, else computed by ``trial`` (all generators seeded first) and stored."""
    trials = run.dir / "trials"
    records = []
    for seed in track(config.seed_list, f"{spec.name}: seeds"):
        path = trials / f"seed{seed}.json"
        if path.is_file():
            records.append(run.load_record("", path=path))
            continue
        seed_everything(derive_seed(seed, spec.name, "trial"))
        record = roundtrip(spec.trial(config, seed, run.trial(seed)))
        if not isinstance(record, dict):
            raise TypeError(f"{spec.name}: trial must return a dict (a JSON record), got {type(record).__name__}")
        if distributed.is_main():
            trials.mkdir(parents=True, exist_ok=True)
        run.save_record("", record, path=path)
        records.append(record)
    return records


def _check_folder(spec: ExperimentSpec, config: Any, out: Path, record: dict[str, Any], resume: bool) -> None:
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise WeightlabError(f"--resume: {str(out)!r} holds no config.yaml, so there is no run to resume")
        previous = yaml.safe_load(saved.read_text()) or {}
        if previous.get("config") != record["config"]:
            diff = sorted(k for k in record["config"] if previous.get("config", {}).get(k) != record["config"][k])
            raise WeightlabError(f"--resume: the config differs from the interrupted run's in {', '.join(diff)}")
    elif out.exists():
        raise WeightlabError(f"output folder {str(out)!r} already exists; pass --resume to continue it "
                             "or choose another --out")


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
    _check_folder(spec, config, out, record, resume)
    origin = provenance(config)  # reads the data and model it names: a missing one fails before any write
    distributed.barrier()  # every rank has checked the folder before rank 0 creates it
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", config_yaml(spec, config, profile))
    run = RunContext(out)  # resuming needs no flag: finished seeds and checkpoints are simply reused
    run.logger = make_logger(log, out) if main else None
    try:
        with default_callbacks(*([run.logger] if run.logger else [])):
            records = run_trials(spec, config, run)
    finally:
        if run.logger is not None:
            run.logger.close()
    results = spec.summarise(config, roundtrip(records))
    results = dataclasses.replace(results, seeds=config.seed_list, records=records, provenance=origin)
    for fig_name, fig in results.figures.items():
        run.savefig(fig, fig_name)
    if main:
        write_text_atomic(out / "results.json", json.dumps(results.to_json(), indent=2, allow_nan=False,
                                                           ensure_ascii=False))
        title = f"{name} ({profile}, {seed_label(config.seed_list)})"
        write_text_atomic(out / "results.md", results.to_markdown(title))
    distributed.barrier()
    return out, results
