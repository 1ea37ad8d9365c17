"""Paper key ``lift``: Low-rank Informed Sparse Fine-Tuning (``prepare`` → handle, the sparse AdamW optimizer,
``save_pretrained`` / ``from_pretrained`` adapter folders)."""

from weightlab.methods.lift.adapter import from_pretrained, lift_config
from weightlab.methods.lift.model import (
    DEFAULT_EXCLUDE,
    MASKS,
    SUPPORTED_DTYPES,
    Lift,
    LiftConfig,
    extract_delta,
    find_targets,
    make_selector,
    merge_and_unload,
    prepare,
)
from weightlab.methods.lift.optimizer import SparseAdamW, index_dtype, moment_dtype
from weightlab.methods.lift.sampled import masked_grad_linear, masked_weight_grad

__all__ = [
    "DEFAULT_EXCLUDE",
    "Lift",
    "LiftConfig",
    "MASKS",
    "SUPPORTED_DTYPES",
    "SparseAdamW",
    "extract_delta",
    "find_targets",
    "from_pretrained",
    "index_dtype",
    "lift_config",
    "make_selector",
    "masked_grad_linear",
    "masked_weight_grad",
    "merge_and_unload",
    "moment_dtype",
    "prepare",
]
