"""How claims, effects, seeds and provenance read in every report (run folder, HTML site, results page).

These functions take the JSON of ``results.json`` (plain dicts), so they render old and hostile files alike;
whatever they return is plain text, escaped by the HTML writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from weightlab.report.tables import fmt

VERDICTS = ("held", "not held", "inconclusive")
VERDICT_MARK = {"held": "✅ held", "not held": "❌ not held", "inconclusive": "➖ inconclusive"}


def seed_label(seeds: Sequence[int]) -> str:
    """``"seed 0"`` or ``"seeds 0–4"`` (the list when not consecutive; ``"no seeds"`` when empty)."""
    seeds = list(seeds)
    if not seeds:
        return "no seeds"
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def seeds_phrase(n: int) -> str:
    """For plot titles: ``"1 seed"`` or ``"mean of 3 seeds"``."""
    return "1 seed" if n == 1 else f"mean of {n} seeds"


def over_seeds(n: int) -> str:
    """For table titles: ``"1 seed"`` or ``"mean ± std over 3 seeds"``."""
    return "1 seed" if n == 1 else f"mean ± std over {n} seeds"


def verdict_of(claim: dict[str, Any]) -> str:
    """A claim's verdict; files written before verdicts existed have none (``"–"``)."""
    verdict = claim.get("verdict")
    return verdict if verdict in VERDICTS else "–"


def verdict_counts(claims: Sequence[dict[str, Any]]) -> str:
    """``"1 held · 0 not held · 2 inconclusive"``."""
    found = [verdict_of(c) for c in claims]
    return " · ".join(f"{found.count(v)} {v}" for v in VERDICTS)


def num(value: Any) -> str:
    """A figure to three significant digits (``–`` when missing)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else fmt(value)


def interval_text(e: dict[str, Any]) -> str:
    """``"0.052 [0.013, 0.091]"`` — one seed has no interval, nor has a measurement at its floor (the
    experiment's notes say which)."""
    ci = e.get("ci95")
    lo, hi = ci if isinstance(ci, list) and len(ci) == 2 else (None, None)
    if lo is None or hi is None:
        why = "one seed" if e.get("n") in (None, 0, 1) else "no resolution, see the notes"
        return f"{num(e.get('mean'))} ({why}: no interval)"
    return f"{num(e.get('mean'))} [{num(lo)}, {num(hi)}]"


def claimed_text(e: dict[str, Any]) -> str:
    return str(e.get("claimed", "")).replace(">=", "≥").replace("<=", "≤")


def effect_text(e: dict[str, Any]) -> str:
    """``"acc(joint) − acc(replay) = 0.052 [0.013, 0.091], n = 3; claimed ≥ 0"``."""
    return f"{e.get('quantity', '')} = {interval_text(e)}, n = {e.get('n')}; claimed {claimed_text(e)}"


def claim_rows(claims: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Claims as table rows: claim, verdict, the deciding effect with its interval, measured, paper."""
    rows = []
    for c in claims:
        e = c.get("effect")
        rows.append({"claim": c.get("text", ""), "verdict": VERDICT_MARK.get(verdict_of(c), "–"),
                     "effect [95% CI]": effect_text(e) if isinstance(e, dict) else "–",
                     "measured": ", ".join(f"{k} = {num(v)}" for k, v in (c.get("measured") or {}).items()),
                     "paper": c.get("paper", "")})
    return rows


def provenance_text(prov: dict[str, Any]) -> str:
    """One line: code version and commit, torch, python, device and threads, data and model with digests."""
    if not prov:
        return "not recorded (a run from before provenance was written)"
    commit = str(prov.get("git_commit", "unknown"))[:12] + (" (uncommitted changes)" if prov.get("git_dirty") else "")
    parts = [f"weightlab {prov.get('weightlab')} at {commit}", f"torch {prov.get('torch')}",
             f"python {prov.get('python')}", f"{prov.get('device')} × {prov.get('threads')} threads"]
    for kind in ("data", "model"):
        item = prov.get(kind)
        if isinstance(item, dict):
            digest = f", sha256 {str(item['sha256'])[:12]}…" if item.get("sha256") else ""
            parts.append(f"{kind} {item.get('name')} ({item.get('source')}{digest})")
    return "; ".join(parts)
