"""Paper key ``scole``: the strategies run on SCoLe streams (the generator is :mod:`weightlab.data.scenarios`)."""

from weightlab.methods.scole.strategies import (
    FrequencyReplay,
    GroupMasking,
    TaskOptimizer,
)

__all__ = [
    "FrequencyReplay",
    "GroupMasking",
    "TaskOptimizer",
]
