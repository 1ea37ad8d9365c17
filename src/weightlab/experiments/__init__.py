"""Experiments, one file per paper claim. Every module in this package registers itself on import."""

import importlib
import pkgutil

from weightlab.experiments.base import Claim, ExperimentSpec, Results, experiment, get, run_experiment

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Claim", "ExperimentSpec", "Results", "experiment", "get", "run_experiment"]
