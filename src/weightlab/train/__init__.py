"""The one training loop, its callbacks, evaluation and continual-learning metrics."""

from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy, accuracy_row, per_class_accuracy, predict
from weightlab.train.loop import LoopState, TrainConfig, default_forward, make_optimizer, train
from weightlab.train.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forgetting_avalanche,
    forward_transfer,
)

__all__ = [
    "Callback", "LoopState", "TrainConfig", "accuracy", "accuracy_row", "average_accuracy",
    "average_incremental_accuracy", "backward_transfer", "default_forward", "forgetting", "forgetting_avalanche",
    "forward_transfer", "make_optimizer", "per_class_accuracy", "predict", "train",
]
