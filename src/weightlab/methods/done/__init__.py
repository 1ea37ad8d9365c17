"""Paper key ``done``: doubly robust instance-reweighted adversarial training."""

from weightlab.methods.done.dro import (
    DONE,
    DONEConfig,
    RunningNormaliser,
    dro_objective,
    dro_weights,
    effective_sample_size,
)

__all__ = [
    "DONE",
    "DONEConfig",
    "RunningNormaliser",
    "dro_objective",
    "effective_sample_size",
    "dro_weights",
]
