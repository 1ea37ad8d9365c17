"""Paper key ``rnn-hypernetwork``: task-conditioned (RNN, chunked, MLP) hypernetworks for continual learning."""

from weightlab.methods.hypernet.hypernetworks import (
    ChunkedMLPHyperNet,
    HnetRegConfig,
    HyperModel,
    HyperNetwork,
    LSTMHyperNet,
    MLPHyperNet,
    OutputRegularizer,
    count_parameters,
    output_regularizer,
    param_shapes,
    unflatten,
    weight_importance,
)

__all__ = [
    "ChunkedMLPHyperNet",
    "HnetRegConfig",
    "HyperModel",
    "HyperNetwork",
    "LSTMHyperNet",
    "MLPHyperNet",
    "OutputRegularizer",
    "count_parameters",
    "output_regularizer",
    "param_shapes",
    "unflatten",
    "weight_importance",
]
