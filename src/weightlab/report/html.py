"""A static HTML report of run folders: ``weightlab report RUNS_DIR --out SITE_DIR``.

The site needs no server (open ``SITE_DIR/index.html`` from disk): an index with the claims of every run
(claim, measured figures, paper figure, held or not) and a thumbnail of each run's first plot, one page per
run with its config, tables and plots, and one page per sweep with its aggregate table and plots. Plots are
copied into the site, so it can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from weightlab.errors import WeightlabError
from weightlab.report.tables import fmt
from weightlab.weights.io import write_text_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
table{border-collapse:collapse;margin:1rem 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f0f0f0}.held{color:#0a7a0a;font-weight:600}.failed{color:#b00020;font-weight:600}
img.plot{max-width:560px;border:1px solid #ddd;margin:6px}img.thumb{max-width:160px;border:1px solid #ddd}
code{background:#f4f4f4;padding:1px 4px}nav a{margin-right:1rem}
"""
# After load, record how many images rendered (naturalWidth > 0): headless browser tests read this.
SCRIPT = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-rendered',ok+'/'+im.length);});</script>"""


def _page(title: str, body: str, *, up: str = "") -> str:
    nav = f'<nav><a href="{up}index.html">← all runs</a></nav>' if up else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{nav}<h1>{html.escape(title)}</h1>{body}{SCRIPT}</body></html>")


def _table(rows: list[dict[str, Any]], *, table_id: str = "") -> str:
    """Rows of dicts as an HTML table; cells that are links or images stay HTML, claims get a held class."""
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    ident = f" id='{table_id}'" if table_id else ""
    out = [f"<table{ident}><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            raw = isinstance(v, str) and v.startswith(("<a ", "<img "))
            cls = HELD.get(str(v), "") if c == "held" else ""
            text = v if raw else html.escape(fmt(v))
            cells.append(f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _slug(path: Path, root: Path) -> str:
    rel = str(path.relative_to(root))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name if rel == "." else rel)


def _copy_plots(src: Path, dest: Path) -> list[str]:
    names = []
    for png in sorted((src / "plots").glob("*.png")):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, dest / png.name)
        names.append(png.name)
    return names


HELD = {"yes": "held", "no": "failed"}


def _claim_rows(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"claim": c["text"], "measured": ", ".join(f"{k} = {fmt(v)}" for k, v in c["measured"].items()),
             "paper": c.get("paper", ""), "held": "yes" if c["held"] else "no"} for c in claims]


def build_site(runs_dir: Path, out: Path) -> Path:
    """Write the site for every run and sweep under ``runs_dir``; returns the index path."""
    runs_dir, out = Path(runs_dir), Path(out)
    if not runs_dir.is_dir():
        raise WeightlabError(f"{str(runs_dir)!r} is not a folder of runs")
    runs = sorted(p.parent for p in runs_dir.rglob("results.json"))
    sweeps = sorted(p.parent for p in runs_dir.rglob("sweep.json"))
    if not runs and not sweeps:
        raise WeightlabError(f"no finished runs (results.json) or sweeps (sweep.json) under {str(runs_dir)!r}")
    out.mkdir(parents=True, exist_ok=True)
    index_rows: list[dict[str, Any]] = []
    for run in runs:
        slug = _slug(run, runs_dir)
        results = json.loads((run / "results.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        plots = _copy_plots(run, out / "runs" / slug)
        body = [f"<p>folder: <code>{html.escape(str(run))}</code></p>", "<h2>Claims</h2>",
                _table(_claim_rows(results["claims"]))]
        for name, rows in results.get("tables", {}).items():
            body += [f"<h2>{html.escape(name)}</h2>", _table(rows)]
        body += ["<h2>Plots</h2>"] + [f"<img class='plot' src='{p}' alt='{p}'>" for p in plots]
        if results.get("notes"):
            body += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in results["notes"]] + ["</ul>"]
        body += ["<h2>Config</h2>", f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"]
        title = f"{config.get('experiment', run.name)} — {run.name}"
        write_text_atomic(out / "runs" / slug / "index.html", _page(title, "".join(body), up="../../"))
        link = f"<a href='runs/{slug}/index.html'>{html.escape(str(run.relative_to(runs_dir)))}</a>"
        thumb = f"<img class='thumb' src='runs/{slug}/{plots[0]}' alt='plot'>" if plots else ""
        for i, c in enumerate(_claim_rows(results["claims"])):
            index_rows.append({"run": link, "experiment": config.get("experiment", ""),
                               "profile": config.get("profile", ""), **c, "plot": thumb if i == 0 else ""})
    sweep_rows = []
    for sweep in sweeps:
        slug = _slug(sweep, runs_dir)
        info = json.loads((sweep / "sweep.json").read_text())
        plots = _copy_plots(sweep, out / "sweeps" / slug)
        failed = [c for c in info["cells"] if c["status"] == "failed"]
        body = [f"<p>{len(info['cells'])} cells, {info['seeds']} seed(s) per point, profile "
                f"<code>{html.escape(info['profile'])}</code>, grid "
                f"<code>{html.escape(json.dumps(info['grid']))}</code></p>",
                "<h2>Aggregate (mean ± std over seeds)</h2>", _table(info["aggregate"]),
                "<h2>Plots</h2>"] + [f"<img class='plot' src='{p}' alt='{p}'>" for p in plots]
        if failed:
            body += ["<h2>Failed cells</h2>", _table([{"cell": c["cell"], "error": c["error"]} for c in failed])]
        write_text_atomic(out / "sweeps" / slug / "index.html",
                          _page(f"sweep of {info['experiment']}", "".join(body), up="../../"))
        name = html.escape(str(sweep.relative_to(runs_dir)))
        sweep_rows.append({"sweep": f"<a href='sweeps/{slug}/index.html'>{name}</a>",
                           "experiment": info["experiment"], "cells": len(info["cells"]), "failed": len(failed)})
    index = [f"<p>{len(runs)} runs, {len(sweeps)} sweeps from <code>{html.escape(str(runs_dir))}</code></p>",
             "<h2>Claims</h2>", _table(index_rows, table_id="claims")]
    if sweep_rows:
        index += ["<h2>Sweeps</h2>", _table(sweep_rows, table_id="sweeps")]
    path = out / "index.html"
    write_text_atomic(path, _page("weightlab report", "".join(index)))
    return path

