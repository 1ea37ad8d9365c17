"""Experiments, one file per paper claim. Every module in this package registers itself on import.

The framework (``base``: registration and the run loop; ``configs``: checked config dataclasses; ``results``:
claims and tables; ``provenance``) is not an experiment; nor are modules whose names start with ``_``.
"""

import importlib
import pkgutil

from weightlab.experiments.base import Claim, ExperimentSpec, Results, claim, experiment, get, run_experiment
from weightlab.experiments.configs import ExperimentConfig

FRAMEWORK = {"base", "configs", "results", "provenance"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in FRAMEWORK and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Claim", "ExperimentConfig", "ExperimentSpec", "Results", "claim", "experiment", "get", "run_experiment"]
