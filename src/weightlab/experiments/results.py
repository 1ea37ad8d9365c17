"""What an experiment's ``summarise`` returns: tables, claims judged over seeds, figures, data and notes.

A :class:`Claim` is one sentence of the paper and the effects that decide it (:mod:`weightlab.stats`): each
effect is one quantity over seeds on a claimed side of a threshold; the claim's verdict combines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from weightlab.report.claims import claim_rows as rendered_claim_rows
from weightlab.report.claims import provenance_text
from weightlab.report.tables import markdown_table
from weightlab.stats import Effect, Verdict, combine, deciding

MAX_PARTS = 12  # a claim with more parts (one per point of a curve) stores the counts of their verdicts


@dataclass(frozen=True)
class Claim:
    """A paper's claim in one sentence, the figures this run measured, and the effects that judge it.

    ``effects`` are the parts of the claim ("joint ≥ replay" and "replay ≥ finetune"); the verdict is held when
    every part held, not held when any part is not held, inconclusive otherwise.
    """

    text: str
    measured: dict[str, Any]
    effects: tuple[Effect, ...]
    paper: str = ""

    def __post_init__(self) -> None:
        combine(e.verdict for e in self.effects)  # at least one effect

    @property
    def verdict(self) -> Verdict:
        return combine(e.verdict for e in self.effects)

    @property
    def held(self) -> bool:
        return self.verdict == "held"

    @property
    def direction(self) -> bool:
        """Whether every part's mean lies on its claimed side (what a one-seed test can check)."""
        return all(e.direction for e in self.effects)

    @property
    def effect(self) -> Effect:
        """The part that decides the verdict."""
        return deciding(self.effects)

    def to_json(self) -> dict[str, Any]:
        out = {"text": self.text, "paper": self.paper, "measured": self.measured,
               "effect": self.effect.to_json(), "verdict": self.verdict, "held": self.held,
               "direction": self.direction}  # the means point the claimed way (no statistical weight)
        if 1 < len(self.effects) <= MAX_PARTS:
            out["parts"] = [e.to_json() for e in self.effects]
        elif len(self.effects) > MAX_PARTS:  # e.g. one part per point of a curve: the counts, not the list
            found = [e.verdict for e in self.effects]
            out["parts_verdicts"] = {v: found.count(v) for v in ("held", "not held", "inconclusive")}
        return out


def claim(text: str, *effects: Effect, measured: dict[str, Any] | None = None, paper: str = "") -> Claim:
    """A :class:`Claim` judged by ``effects``; ``measured`` defaults to each effect's mean."""
    return Claim(text, measured if measured is not None else {e.quantity: e.mean for e in effects},
                 tuple(effects), paper)


@dataclass
class Results:
    """What ``summarise`` returns: named tables (rows of dicts), claims, figures, extra JSON data and notes.

    ``figures`` (matplotlib figures by file stem) are saved as ``plots/<name>.png`` by the framework, which
    also fills ``seeds``, ``records`` (each seed's trial record) and ``provenance``.
    """

    tables: dict[str, list[dict[str, Any]]]
    claims: list[Claim]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return jsonable({"seeds": self.seeds, "claims": [c.to_json() for c in self.claims], "tables": self.tables,
                         "notes": self.notes, "data": self.data, "provenance": self.provenance,
                         "records": {str(s): r for s, r in zip(self.seeds, self.records, strict=True)}})

    def to_markdown(self, title: str) -> str:
        parts = [f"# {title}\n", "## Claims\n", markdown_table(claim_rows(self.claims))]
        for name, rows in self.tables.items():
            parts += [f"\n## {name}\n", markdown_table(rows)]
        if self.notes:
            parts += ["\n## Notes\n", "".join(f"- {n}\n" for n in self.notes)]
        if self.provenance:
            parts += ["\n## Provenance\n", provenance_text(self.provenance) + "\n"]
        return "\n".join(parts)


def claim_rows(claims: list[Claim] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Claims (objects or their JSON) as table rows: claim, verdict, deciding effect, measured, paper."""
    return rendered_claim_rows([c.to_json() if isinstance(c, Claim) else c for c in claims])


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: tuples → lists, tensors and NumPy values → Python, NaN and ±inf → None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
