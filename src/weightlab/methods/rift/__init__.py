"""Paper key ``rift``: robust critical fine-tuning."""

from weightlab.methods.rift.rift import (
    DEFAULT_ALPHAS,
    RiFT,
    RiFTConfig,
    check_module,
    finetune,
    freeze_except,
    interpolate,
    interpolation_search,
    module_robust_criticality,
    robust_evaluator,
    weight_modules,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "RiFT",
    "RiFTConfig",
    "check_module",
    "finetune",
    "freeze_except",
    "interpolate",
    "interpolation_search",
    "module_robust_criticality",
    "robust_evaluator",
    "weight_modules",
]
