"""Paired statistics over seeds: known answers for the interval, the verdict rule and combined claims."""

import math

import pytest

from weightlab.errors import WeightlabError
from weightlab.stats import combine, deciding, effect, judge, mean_ci95, paired


def test_t_interval_known_answer() -> None:
    mean, (lo, hi) = mean_ci95([1.0, 2.0, 3.0])
    # t(0.975, df=2) = 4.302653; sd = 1; half-width = 4.302653 / sqrt(3) = 2.484138
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - 2.484138, abs=1e-6) and hi == pytest.approx(2.0 + 2.484138, abs=1e-6)
    mean, (lo, hi) = mean_ci95([0.5, 0.5, 0.5, 0.5])
    assert (mean, lo, hi) == (0.5, 0.5, 0.5)  # no spread: the interval is the point


def test_one_seed_has_no_interval_and_nan_seeds_are_left_out() -> None:
    assert mean_ci95([0.7]) == (0.7, None)
    e = effect("x", [0.7, math.nan])
    assert e.n == 1 and e.ci95 is None and e.verdict == "inconclusive"
    assert e.to_json()["ci95"] == [None, None]
    mean, ci = mean_ci95([])
    assert math.isnan(mean) and ci is None


@pytest.mark.parametrize("ci, side, threshold, expected", [
    ((0.1, 0.3), ">", 0.0, "held"),
    ((-0.3, -0.1), ">", 0.0, "not held"),
    ((-0.1, 0.3), ">", 0.0, "inconclusive"),
    ((0.0, 0.3), ">", 0.0, "inconclusive"),  # touching the threshold is not on the strict side
    ((0.0, 0.3), ">=", 0.0, "held"),
    ((-0.3, 0.0), ">", 0.0, "not held"),     # wholly ≤ 0 is the other side of "> 0"
    ((-0.3, 0.0), ">=", 0.0, "inconclusive"),
    ((0.2, 0.4), ">", 0.3, "inconclusive"),  # a threshold other than 0
    ((0.31, 0.4), ">", 0.3, "held"),
    ((-0.3, -0.1), "<", 0.0, "held"),
    ((0.1, 0.3), "<", 0.0, "not held"),
    ((-0.3, 0.0), "<=", 0.0, "held"),
    ((0.0, 0.3), "<=", 0.0, "inconclusive"),
    (None, ">", 0.0, "inconclusive"),
])
def test_verdict_rule(ci, side, threshold, expected) -> None:
    assert judge(ci, side, threshold) == expected


def test_unknown_side_is_an_error() -> None:
    with pytest.raises(WeightlabError, match="claimed side '!='"):
        judge((0.0, 1.0), "!=", 0.0)


def test_paired_differences_cancel_the_seed_effect() -> None:
    # the seed moves both arms by a lot; the difference is always +0.02: held despite the spread of each arm
    base = [0.50, 0.80, 0.60, 0.90, 0.70]
    method = [b + 0.02 for b in base]
    e = paired("acc(method) − acc(base)", method, base)
    assert e.mean == pytest.approx(0.02) and e.ci95[0] == pytest.approx(0.02) and e.verdict == "held"
    assert effect("acc(method)", method).verdict == "held"  # > 0 trivially; the interval of the arm is wide
    assert effect("acc(method) − 0.7", [m - 0.7 for m in method]).verdict == "inconclusive"
    with pytest.raises(WeightlabError, match="3 values against 2"):
        paired("x", [1, 2, 3], [1, 2])


def test_combined_verdict_and_the_deciding_part() -> None:
    held = effect("a", [1.0, 1.1, 1.2])
    close = effect("b", [0.1, 0.2, 0.15])  # held, but nearer its threshold
    unsure = effect("c", [-1.0, 1.0, 0.5])
    wrong = effect("d", [-1.0, -1.1, -1.2])
    assert combine([held.verdict, close.verdict]) == "held"
    assert combine([held.verdict, unsure.verdict]) == "inconclusive"
    assert combine([held.verdict, unsure.verdict, wrong.verdict]) == "not held"
    assert deciding([held, close]) is close
    assert deciding([held, unsure, wrong]) is wrong
    assert deciding([held, unsure]) is unsure
    with pytest.raises(WeightlabError, match="at least one effect"):
        combine([])
