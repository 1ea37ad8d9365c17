"""weightlab: work on what a neural network knows in its weights.

The flat public API: data, models, the training loop and its metrics. Method modules live under
``weightlab.methods`` (one per paper key) and experiments under ``weightlab.experiments``.
"""

__version__ = "0.1.0"

from weightlab.data import ArrayDataset, Batch, Experience, class_incremental, digits, task_incremental
from weightlab.errors import WeightlabError
from weightlab.train import Callback, TrainConfig, accuracy, train

__all__ = [
    "ArrayDataset", "Batch", "Callback", "Experience", "TrainConfig", "WeightlabError", "__version__", "accuracy",
    "class_incremental", "digits", "task_incremental", "train",
]
