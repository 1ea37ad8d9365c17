"""A static HTML report of run folders: ``weightlab report RUNS_DIR --out SITE_DIR``.

The site needs no server (open ``SITE_DIR/index.html`` from disk): an index with one section per experiment
(each run's claims: verdict, effect with its 95% interval, paper figure; smoke runs marked) and a thumbnail
of each run's first plot, one page per run (claims, tables, plots, notes, provenance, config), and one page
per sweep. Plots are copied into the site, so it can be moved or zipped as a whole.

Run folders are untrusted: every value read from them is escaped, and the only links and images are built
here from the report's own file names (sanitized slugs, checked by :func:`_url`). Every input is read and
checked before the first file is written, so a malformed folder leaves no half-built site.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weightlab.report.claims import claim_rows, provenance_text, seed_label, verdict_of
from weightlab.report.collect import RunRecord, SweepRecord, collect
from weightlab.report.tables import fmt
from weightlab.weights.io import write_text_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f0f0f0}.held{color:#0a7a0a;font-weight:600}.failed{color:#b00020;font-weight:600}
.inconclusive{color:#8a6d00;font-weight:600}.smoke{background:#fff3cd;color:#6b4e00;padding:1px 6px;border-radius:4px}
img.plot{max-width:560px;border:1px solid #ddd;margin:6px}img.thumb{max-width:160px;border:1px solid #ddd}
code{background:#f4f4f4;padding:1px 4px}nav a{margin-right:1rem}
"""
# After load, record how many images rendered (naturalWidth > 0): headless browser tests read this.
SCRIPT = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-rendered',ok+'/'+im.length);});</script>"""
VERDICT_CLASS = {"held": "held", "not held": "failed", "inconclusive": "inconclusive"}
SMOKE_NOTE = ("smoke run: a seconds-long check that the code runs, with tiny budgets and few seeds; "
              "its verdicts are not evidence")
_SAFE_URL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")


def _url(path: str) -> str:
    """A relative URL inside the site, built from the report's own names; anything else is a bug here."""
    if not _SAFE_URL.fullmatch(path) or ".." in path.split("/"):
        raise ValueError(f"refusing to link to {path!r}: site URLs are relative paths of safe characters")
    return path


def _e(value: Any) -> str:
    """Escape an untrusted value for text or a quoted attribute."""
    return html.escape(value if isinstance(value, str) else fmt(value), quote=True)


@dataclass(frozen=True)
class Link:
    """A trusted link cell: escaped text, a checked relative URL."""

    text: str
    href: str

    def html(self) -> str:
        return f"<a href='{_url(self.href)}'>{_e(self.text)}</a>"


@dataclass(frozen=True)
class Image:
    src: str
    cls: str = "thumb"

    def html(self) -> str:
        return f"<img class='{self.cls}' src='{_url(self.src)}' alt='plot'>"


@dataclass(frozen=True)
class Styled:
    """Escaped text in a span of one of this module's CSS classes."""

    text: str
    cls: str

    def html(self) -> str:
        return f"<span class='{self.cls}'>{_e(self.text)}</span>"


Trusted = (Link, Image, Styled)


def _page(title: str, body: str, *, up: str = "") -> str:
    assert up in ("", "../../"), up  # pages sit at the top or two folders down (runs/<slug>/, sweeps/<slug>/)
    nav = f"<nav><a href='{up}index.html'>← all runs</a></nav>" if up else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{nav}<h1>{_e(title)}</h1>{body}{SCRIPT}</body></html>")


def _table(rows: list[dict[str, Any]], *, table_id: str = "") -> str:
    """Rows of dicts as an HTML table: trusted cells (links, images, styled text) render, the rest is escaped."""
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(dict.fromkeys(str(k) for r in rows for k in r))
    ident = f" id='{_e(table_id)}'" if table_id else ""
    out = [f"<table{ident}><thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        out.append("<tr>" + "".join(f"<td>{v.html() if isinstance(v, Trusted) else _e(v)}</td>" for v in cells)
                   + "</tr>")
    return "".join(out) + "</tbody></table>"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "run"


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, … if already used (two folders can share a slug)."""
    found, k = name, 1
    while found in used:
        k += 1
        found = f"{name}-{k}"
    used.add(found)
    return found


def _plot_names(plots: list[Path]) -> list[tuple[Path, str]]:
    """Each plot with a safe, unique file name in the site."""
    used: set[str] = set()
    return [(png, _unique(_slug(png.stem), used) + ".png") for png in plots]


def _claims_table_rows(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = claim_rows(claims)
    for row, c in zip(rows, claims, strict=True):
        verdict = verdict_of(c)
        row["verdict"] = Styled(row["verdict"], VERDICT_CLASS[verdict]) if verdict in VERDICT_CLASS else row["verdict"]
    return rows


def _profile_cell(run: RunRecord) -> Any:
    return Styled("smoke", "smoke") if run.smoke else run.profile


def _run_title(run: RunRecord) -> str:
    return f"{run.experiment} — {run.profile or 'run'}, {seed_label(run.seeds)}"


def _run_page(run: RunRecord, plots: list[str]) -> str:
    res = run.results
    body = [f"<p class='smoke'>{_e(SMOKE_NOTE)}</p>" if run.smoke else "",
            f"<p>folder: <code>{_e(run.rel)}</code></p>", "<h2>Claims</h2>", _table(_claims_table_rows(res["claims"]))]
    for name, rows in res.get("tables", {}).items():
        body += [f"<h2>{_e(name)}</h2>", _table(rows)]
    body += ["<h2>Plots</h2>"] + [Image(p, "plot").html() for p in plots]
    if res.get("notes"):
        body += ["<h2>Notes</h2><ul>"] + [f"<li>{_e(n)}</li>" for n in res["notes"]] + ["</ul>"]
    body += ["<h2>Provenance</h2>", f"<p>{_e(provenance_text(res.get('provenance') or {}))}</p>",
             "<h2>Config</h2>", f"<pre>{_e(yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True))}</pre>"]
    return _page(_run_title(run), "".join(body), up="../../")


def _sweep_page(sweep: SweepRecord, plots: list[str]) -> str:
    info = sweep.info
    failed = [c for c in info["cells"] if c.get("status") == "failed"]
    body = [f"<p>{len(info['cells'])} cells, {_e(info.get('seeds'))} seed(s) per point, profile "
            f"<code>{_e(info.get('profile'))}</code>, grid <code>{_e(json.dumps(info.get('grid')))}</code></p>",
            "<h2>Aggregate (mean ± std over seeds)</h2>", _table(info.get("aggregate", [])), "<h2>Plots</h2>"]
    body += [Image(p, "plot").html() for p in plots]
    if failed:
        body += ["<h2>Failed cells</h2>", _table([{"cell": c.get("cell"), "error": c.get("error")} for c in failed])]
    return _page(f"sweep of {fmt(info.get('experiment'))}", "".join(body), up="../../")


def build_site(runs_dir: Path, out: Path) -> Path:
    """Write the site for every run and sweep under ``runs_dir``; returns the index path."""
    runs, sweeps = collect(Path(runs_dir))  # everything read and checked before anything is written
    out = Path(out)
    pages: dict[str, str] = {}
    copies: list[tuple[Path, str]] = []
    sections: dict[str, list[dict[str, Any]]] = {}
    used: set[str] = set()
    for run in runs:
        folder = f"runs/{_unique(_slug(run.rel), used)}"
        plots = _plot_names(run.plots)
        copies += [(src, f"{folder}/{name}") for src, name in plots]
        pages[f"{folder}/index.html"] = _run_page(run, [name for _, name in plots])
        link = Link(run.rel, f"{folder}/index.html")
        thumb = Image(f"{folder}/{plots[0][1]}") if plots else ""
        rows = _claims_table_rows(run.results["claims"]) or [{"claim": "(no claims)"}]
        for i, row in enumerate(rows):
            sections.setdefault(run.experiment, []).append(
                {"run": link, "profile": _profile_cell(run), "seeds": seed_label(run.seeds), **row,
                 "plot": thumb if i == 0 else ""})
    sweep_rows = []
    for sweep in sweeps:
        folder = f"sweeps/{_unique(_slug(sweep.rel), used)}"
        plots = _plot_names(sweep.plots)
        copies += [(src, f"{folder}/{name}") for src, name in plots]
        pages[f"{folder}/index.html"] = _sweep_page(sweep, [name for _, name in plots])
        sweep_rows.append({"sweep": Link(sweep.rel, f"{folder}/index.html"), "experiment": sweep.info.get("experiment"),
                           "cells": len(sweep.info["cells"]),
                           "failed": sum(c.get("status") == "failed" for c in sweep.info["cells"])})
    index = [f"<p>{len(runs)} runs, {len(sweeps)} sweeps from <code>{_e(str(runs_dir))}</code>. "
             f"<span class='smoke'>smoke</span> marks {_e(SMOKE_NOTE[len('smoke run: '):])}.</p>"]
    for name, rows in sorted(sections.items()):
        index += [f"<h2 id='{_e(_slug(name))}'>{_e(name)}</h2>", _table(rows, table_id=f"claims-{_slug(name)}")]
    if sweep_rows:
        index += ["<h2>Sweeps</h2>", _table(sweep_rows, table_id="sweeps")]
    pages["index.html"] = _page("weightlab report", "".join(index))
    for src, rel in copies:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)
    for rel, text in pages.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / rel, text)
    return out / "index.html"
