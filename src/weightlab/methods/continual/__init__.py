"""What several continual-learning keys share: replay memories, iCaRL exemplars, EWC."""

from weightlab.methods.continual.ewc import (
    EWC,
    EWCConfig,
    diagonal_fisher,
    ewc_penalty,
)
from weightlab.methods.continual.exemplars import (
    HerdingSelector,
    NearestMeanClassifier,
    class_means,
    extract_features,
    herding,
)
from weightlab.methods.continual.replay import (
    Replay,
    ReplayBuffer,
    ReplayConfig,
)

__all__ = [
    "EWC",
    "EWCConfig",
    "HerdingSelector",
    "NearestMeanClassifier",
    "Replay",
    "ReplayBuffer",
    "ReplayConfig",
    "class_means",
    "diagonal_fisher",
    "ewc_penalty",
    "extract_features",
    "herding",
]
