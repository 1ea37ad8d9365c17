"""Paper key ``done``: doubly robust instance-reweighted adversarial training."""

from weightlab.methods.done.dro import (
    DONE,
    DONEConfig,
    RunningNormaliser,
    dro_objective,
    dro_weights,
)

__all__ = [
    "DONE",
    "DONEConfig",
    "RunningNormaliser",
    "dro_objective",
    "dro_weights",
]
