"""Known-answer tests of the continual-learning metrics on hand-made accuracy matrices."""

import numpy as np
import pytest
import torch

from weightlab.errors import WeightlabError
from weightlab.train.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forgetting_avalanche,
    forward_transfer,
)

# R[i, j]: accuracy on task j after training through task i (3 tasks).
R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_forgetting_max_based():
    # f_0 = max(0.9, 0.6) - 0.5 = 0.4 ; f_1 = max(0.1, 0.8) - 0.7 = 0.1
    assert forgetting(R) == pytest.approx((0.4 + 0.1) / 2)


def test_forgetting_max_differs_from_avalanche_variant():
    # peak on task 0 is reached after task 1, not right after learning it
    M = [[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.4, 0.8, 0.9]]
    assert forgetting(M) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert forgetting_avalanche(M) == pytest.approx(((0.5 - 0.4) + (0.8 - 0.8)) / 2)


def test_backward_transfer():
    # (0.5 - 0.9 + 0.7 - 0.8) / 2
    assert backward_transfer(R) == pytest.approx(-0.25)


def test_forward_transfer():
    # R[0,1] - b1 + R[1,2] - b2 = (0.1 - 0.1) + (0.3 - 0.1)
    assert forward_transfer(R, [0.1, 0.1, 0.1]) == pytest.approx(0.1)


def test_metrics_accept_tensor_and_array():
    for m in (torch.tensor(R), np.array(R)):
        assert forgetting(m) == pytest.approx(0.25)
        assert average_accuracy(m) == pytest.approx(average_accuracy(R))


def test_single_task_has_no_forgetting():
    assert forgetting([[0.7]]) == 0.0
    assert backward_transfer([[0.7]]) == 0.0


def test_average_incremental_accuracy():
    assert average_incremental_accuracy([1.0, 0.8, 0.6]) == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [[[0.1, 0.2]], [0.1, 0.2], []])
def test_non_square_matrix_is_rejected(bad):
    with pytest.raises(WeightlabError, match="square"):
        forgetting(bad)


def test_forward_transfer_baseline_length_checked():
    with pytest.raises(WeightlabError, match="one accuracy per task"):
        forward_transfer(R, [0.1, 0.1])
