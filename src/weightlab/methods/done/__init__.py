"""Paper key ``done``: doubly robust instance-reweighted adversarial training, and its baselines."""

from weightlab.methods.done.baselines import (
    GAIRAT,
    MAIL,
    GAIRATConfig,
    MAILConfig,
    gairat_weights,
    mail_weights,
    probability_margin,
)
from weightlab.methods.done.dro import (
    DONE,
    DONEConfig,
    RunningNormaliser,
    dro_objective,
    dro_weights,
    effective_sample_size,
)
from weightlab.methods.done.implicit import BarrierPGD, conjugate_gradient, implicit_gradient

__all__ = [
    "DONE",
    "GAIRAT",
    "MAIL",
    "BarrierPGD",
    "DONEConfig",
    "GAIRATConfig",
    "MAILConfig",
    "RunningNormaliser",
    "conjugate_gradient",
    "dro_objective",
    "dro_weights",
    "effective_sample_size",
    "gairat_weights",
    "implicit_gradient",
    "mail_weights",
    "probability_margin",
]
