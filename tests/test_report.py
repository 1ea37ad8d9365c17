"""`weightlab report`: hostile run folders are escaped, malformed ones refused before anything is written;
runs are grouped by experiment with smoke runs marked; the results page and README's verdicts agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from weightlab.cli import main
from weightlab.report.claims import verdict_counts
from weightlab.report.collect import collect
from weightlab.report.results_page import results_page

ROOT = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
EVIL_A = "<a href='javascript:alert(2)'>click</a>"
EVIL_IMG = "<img src=x onerror=alert(3)>"


def claim_json(text: str, verdict: str = "held", paper: str = "") -> dict:
    effect = {"quantity": "Δ", "mean": 0.1, "ci95": [0.05, 0.15], "n": 3, "claimed": "> 0", "verdict": verdict}
    return {"text": text, "paper": paper, "measured": {"Δ": 0.1}, "effect": effect, "verdict": verdict,
            "held": verdict == "held"}


def write_run(folder: Path, *, experiment: str, profile: str, claims: list[dict], tables: dict | None = None,
              config: dict | None = None, notes: list | None = None, plots: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True)
    results = {"seeds": [0, 1, 2], "claims": claims, "tables": tables or {}, "notes": notes or [],
               "provenance": {"weightlab": "0.1.0", "git_commit": "abc", "data": {"name": "digits"}}}
    (folder / "results.json").write_text(json.dumps(results))
    record = {"experiment": experiment, "profile": profile, "config": config or {"seed": 0, "seeds": 3}}
    (folder / "config.yaml").write_text(json.dumps(record))  # JSON is YAML
    for name in plots:
        (folder / "plots").mkdir(exist_ok=True)
        (folder / "plots" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_hostile_results_are_escaped_everywhere(tmp_path) -> None:
    runs = tmp_path / "runs"
    write_run(runs / "evil" / "a", experiment=f"evil{XSS}", profile=XSS,
              claims=[claim_json(f"claim {XSS}", paper=EVIL_A), claim_json(EVIL_IMG, verdict=XSS)],
              tables={f"table {XSS}": [{EVIL_A: EVIL_IMG, "cell": EVIL_A}]},
              config={"seed": 0, "seeds": 3, "lr": XSS, "note": EVIL_IMG}, notes=[XSS],
              plots=("x' onerror='alert(4).png", "ok.png"))
    site = tmp_path / "site"
    assert main(["report", str(runs), "--out", str(site)]) == 0
    pages = [p.read_text() for p in site.rglob("*.html")]
    assert len(pages) == 2
    for page in pages:
        assert "<script>alert" not in page and "<a href='javascript" not in page and "<img src=x" not in page
        assert not re.search(r"<[^>]*\bon\w+\s*=", page)  # no event-handler attribute in any real tag
        for href in re.findall(r"(?:href|src)='([^']*)'", page):  # every link is a safe relative path
            assert re.fullmatch(r"[A-Za-z0-9_./-]+", href) and ".." not in href.replace("../../index", "")
        assert page.count("<script>") == 1  # the report's own image counter only
    index = (site / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index and "&lt;img src=x onerror=alert(3)&gt;" in index
    copied = sorted(p.name for p in site.rglob("*.png"))
    assert copied == ["ok.png", "x_onerror_alert_4.png"]


def test_malformed_results_are_one_line_exit_2_and_leave_no_site(tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    write_run(runs / "good" / "a", experiment="good", profile="smoke", claims=[claim_json("fine")])
    bad = runs / "bad" / "b"
    bad.mkdir(parents=True)
    site = tmp_path / "site"
    for content, message in (("{not json", "is not valid JSON"), ("[1, 2]", "expected a JSON object"),
                             ('{"claims": [{"no": "text"}]}', "'claims' must be a list"),
                             ('{"claims": [], "tables": {"t": "rows"}}', "'tables' must map names"),
                             (b"\xff\xfe", "is not UTF-8")):
        (bad / "results.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        assert main(["report", str(runs), "--out", str(site)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert "results.json" in err and not site.exists()
        assert main(["report", str(runs), "--markdown", str(tmp_path / "r.md")]) == 2
        capsys.readouterr()
        assert not (tmp_path / "r.md").exists()
    (bad / "results.json").write_text('{"claims": []}')
    (bad / "config.yaml").write_text("a: [unclosed")
    assert main(["report", str(runs), "--out", str(site)]) == 2
    assert "config.yaml" in capsys.readouterr().err and not site.exists()


def test_runs_grouped_by_experiment_smoke_marked_and_single_seed_titles(tmp_path) -> None:
    from weightlab.experiments.base import run_experiment

    runs = tmp_path / "runs"
    run_experiment("forgetting", profile="smoke", out=runs / "forgetting" / "one",
                   overrides={"seeds": "1", "epochs": "1", "methods": "finetune"})
    write_run(runs / "other" / "x", experiment="aaa-other", profile="quick", claims=[claim_json("other claim")])
    site = tmp_path / "site"
    assert main(["report", str(runs), "--out", str(site)]) == 0
    index = (site / "index.html").read_text()
    assert index.index("<h2 id='aaa-other'>") < index.index("<h2 id='forgetting'>")  # one section each
    assert "<span class='smoke'>smoke</span>" in index
    page = (site / "runs" / "forgetting_one" / "index.html").read_text()
    assert "forgetting — smoke, seed 0" in page and "smoke run:" in page
    assert "± 0.0" not in page and "one seed: no interval" in page
    assert "Provenance" in page and "digits" in page
    other = (site / "runs" / "other_x" / "index.html").read_text()
    assert "aaa-other — quick, seeds 0–2" in other and "smoke run:" not in other


def test_results_page_lists_verdicts_intervals_and_provenance(tmp_path) -> None:
    runs = tmp_path / "runs"
    write_run(runs / "e" / "a", experiment="exp-a", profile="smoke",
              claims=[claim_json("c1"), claim_json("c2", "not held"), claim_json("c3", "inconclusive")])
    page = results_page(collect(runs)[0], source="runs", target="docs/results.md")
    assert "| [exp-a](#exp-a) | smoke, seeds 0–2 | 1 held · 1 not held · 1 inconclusive |" in page
    assert "## exp-a" in page and "0.1 [0.05, 0.15]" in page and "> 0" in page and "do not edit by hand" in page
    assert "Provenance: weightlab 0.1.0 at abc" in page and "Smoke runs" in page
    out = tmp_path / "results.md"
    assert main(["report", str(runs), "--markdown", str(out)]) == 0
    assert out.read_text().startswith("# Results") and not (tmp_path / "site").exists()


def readme_verdicts() -> dict[str, str]:
    """experiment → the verdict counts README's methods table quotes (with its link to docs/results.md)."""
    found = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.search(r"\[([^\]]*· \d+ inconclusive)\]\(docs/results\.md#([a-z-]+)\)", line)
        if m:
            found[m.group(2)] = m.group(1)
    return found


def results_page_verdicts() -> dict[str, str]:
    found = {}
    for line in (ROOT / "docs" / "results.md").read_text().splitlines():
        m = re.match(r"\| \[([a-z-]+)\]\(#[a-z-]+\) \| ([^|]+) \| ([^|]+) \|", line)
        if m and m.group(1) not in found:
            found[m.group(1)] = f"{m.group(2).split(',')[0].strip()}: {m.group(3).strip()}"
    return found


def test_readme_states_the_verdicts_of_the_generated_results_page() -> None:
    page, readme = results_page_verdicts(), readme_verdicts()
    assert set(readme) == set(page) and len(page) == 14, (sorted(readme), sorted(page))
    assert readme == page


def test_verdict_counts_of_old_results_without_verdicts() -> None:
    assert verdict_counts([{"text": "old", "held": True}]) == "0 held · 0 not held · 0 inconclusive"


@pytest.mark.parametrize("wording", ["issue criterion", "the issue's minimum", "issue's", "the issue measured"])
def test_no_internal_wording_in_results_notes_or_docs(wording) -> None:
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    hits = [str(f.relative_to(ROOT)) for f in files if wording in f.read_text().lower()]
    assert not hits, f"internal wording {wording!r} in {hits}"


def test_curves_of_indices_have_integer_ticks() -> None:
    from weightlab.report import plots

    by_index = plots.curves({"a": [0.1, 0.5, 0.9]}, title="t", xlabel="after training task", ylabel="acc")
    assert all(float(t).is_integer() for t in by_index.axes[0].get_xticks())  # no "0.5" task
    by_value = plots.curves({"a": [0.1, 0.5]}, x=[0.0, 0.5], title="t", xlabel="α", ylabel="acc")
    assert not all(float(t).is_integer() for t in by_value.axes[0].get_xticks())


def test_one_seed_tables_have_no_spread() -> None:
    from weightlab.report.tables import pm

    assert pm([0.5]) == "50.0" and pm([0.5, 0.7]) == "60.0 ± 14.1"


def test_an_effect_without_interval_says_why() -> None:
    from weightlab.report.claims import interval_text

    assert interval_text({"mean": 0.1, "ci95": [None, None], "n": 1}) == "0.1 (one seed: no interval)"
    assert interval_text({"mean": 0.0, "ci95": [None, None], "n": 5}) == "0 (no resolution, see the notes: no interval)"
    assert interval_text({"mean": 0.05, "ci95": [0.01, 0.09], "n": 5}) == "0.05 [0.01, 0.09]"
