"""Paired statistics over seeds: how every experiment judges its claims.

A claim is about one quantity per seed — usually a paired difference (method − baseline on the same seed,
data and initial weights), sometimes a statistic against a threshold (forgetting > 0.3). Its 95% interval
is Student's t interval over the seeds, and the verdict compares the whole interval with the claimed side:

* ``"held"`` — the whole interval lies on the claimed side of the threshold;
* ``"not held"`` — the whole interval lies on the other side;
* ``"inconclusive"`` — the interval straddles the threshold (or there is one seed: no interval at all).

A claim made of several parts ("joint ≥ replay ≥ finetune") holds when every part holds and is not held
when any part is not held (the intersection–union test, which keeps the 95% level without correction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from scipy import stats as _scipy_stats

from weightlab.errors import WeightlabError

Verdict = Literal["held", "not held", "inconclusive"]
Side = Literal[">", ">=", "<", "<="]
VERDICTS: tuple[Verdict, ...] = ("held", "not held", "inconclusive")
SIDES: tuple[Side, ...] = (">", ">=", "<", "<=")


def finite(values: Iterable[float]) -> list[float]:
    """The finite values of ``values`` as floats (a seed whose quantity is undefined, NaN, is left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def binomial_se(p: float, n: int) -> float:
    """Standard error ``√(p(1 − p)/n)`` of an accuracy (or error rate) ``p`` measured on ``n`` points (NaN when
    n = 0): how large a test set must be before a gap between two methods means anything."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean of ``values`` and its two-sided 95% t interval (``None`` for fewer than two values).

    Known answer: ``[1, 2, 3]`` → mean 2, half-width ``t(0.975, 2) · 1 / √3 = 4.303 · 0.577 = 2.484``.
    """
    vals = finite(values)
    if not vals:
        return math.nan, None
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(_scipy_stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def judge(ci95: tuple[float, float] | None, side: Side, threshold: float) -> Verdict:
    """The verdict of an interval against ``side threshold`` (see the module docstring)."""
    if side not in SIDES:
        raise WeightlabError(f"claimed side {side!r} is not one of {', '.join(SIDES)}")
    if ci95 is None:
        return "inconclusive"
    lo, hi = ci95
    if side in (">", ">="):
        on_side = lo > threshold if side == ">" else lo >= threshold
        other = hi < threshold if side == ">=" else hi <= threshold
    else:
        on_side = hi < threshold if side == "<" else hi <= threshold
        other = lo > threshold if side == "<=" else lo >= threshold
    if on_side:
        return "held"
    return "not held" if other else "inconclusive"


@dataclass(frozen=True)
class Effect:
    """One quantity over seeds: its mean, 95% interval and the side of ``threshold`` a claim puts it on."""

    quantity: str
    mean: float
    ci95: tuple[float, float] | None
    n: int
    side: Side = ">"
    threshold: float = 0.0

    @property
    def verdict(self) -> Verdict:
        return judge(self.ci95, self.side, self.threshold)

    @property
    def direction(self) -> bool:
        """Whether the mean (not the whole interval) lies on the claimed side: the direction of the claim."""
        return judge((self.mean, self.mean), self.side, self.threshold) == "held"

    @property
    def claimed(self) -> str:
        return f"{self.side} {self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci95 if self.ci95 is not None else (None, None)
        return {"quantity": self.quantity, "mean": _json_float(self.mean), "ci95": [lo, hi], "n": self.n,
                "claimed": self.claimed, "verdict": self.verdict}


def effect(quantity: str, values: Sequence[float], *, side: Side = ">", threshold: float = 0.0) -> Effect:
    """The :class:`Effect` of per-seed ``values`` of ``quantity`` claimed to be ``side threshold``."""
    mean, ci = mean_ci95(values)
    return Effect(quantity, mean, ci, len(finite(values)), side, threshold)


def paired(quantity: str, a: Sequence[float], b: Sequence[float], *, side: Side = ">",
           threshold: float = 0.0) -> Effect:
    """The :class:`Effect` of the per-seed differences ``a[i] − b[i]`` (same seed, same data)."""
    if len(a) != len(b):
        raise WeightlabError(f"paired difference {quantity!r}: {len(a)} values against {len(b)}")
    return effect(quantity, [x - y for x, y in zip(a, b, strict=True)], side=side, threshold=threshold)


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """All parts held → held; any part not held → not held; otherwise inconclusive."""
    found = list(verdicts)
    if not found:
        raise WeightlabError("a claim needs at least one effect to judge")
    if "not held" in found:
        return "not held"
    return "held" if all(v == "held" for v in found) else "inconclusive"


def deciding(effects: Sequence[Effect]) -> Effect:
    """The part that decides a combined verdict: the first not held, else the first inconclusive, else the
    held part whose interval comes closest to its threshold."""
    for wanted in ("not held", "inconclusive"):
        for e in effects:
            if e.verdict == wanted:
                return e
    return min(effects, key=_margin)


def _margin(e: Effect) -> float:
    assert e.ci95 is not None  # every part held, so every part has an interval
    lo, hi = e.ci95
    return lo - e.threshold if e.side in (">", ">=") else e.threshold - hi


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
