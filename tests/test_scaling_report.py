"""The HTML report, checked in a real headless browser (Debian's chromium, installed by .ci/run)."""

import os
import shutil
import subprocess

import pytest
from PIL import Image, ImageStat

from weightlab.cli import main
from weightlab.experiments.base import run_experiment
from weightlab.sweep import run_sweep


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_experiment("forgetting", profile="smoke", out=root / "forgetting" / "a", overrides={"seeds": "1"})
    run_sweep("forgetting", {"lr": ["0.02", "0.05"], "methods": ["finetune"], "epochs": ["1"]}, seeds=1,
              profile="smoke", workers=1, out=root / "sweeps" / "s")
    return root


def test_site_files(runs, tmp_path, capsys):
    site = tmp_path / "site"
    assert main(["report", str(runs), "--out", str(site)]) == 0
    index = (site / "index.html").read_text()
    assert "<table id='claims-forgetting'>" in index and "finetune forgets catastrophically" in index
    assert "sweeps/" in index
    assert (site / "runs" / "forgetting_a" / "accuracy_matrix_finetune.png").is_file()
    assert (site / "sweeps" / "sweeps_s" / "lr.png").is_file()


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "s")]) == 2
    assert "is not a folder of runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must install Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium); .ci/run installs it for CI")
    return found


def test_report_renders_in_a_browser(runs, tmp_path):
    browser = _chromium()
    site = tmp_path / "site"
    assert main(["report", str(runs), "--out", str(site)]) == 0
    url = (site / "index.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "finetune forgets catastrophically" in dom and "<table id=\"claims-forgetting\">" in dom
    rendered = dom.split('data-images-rendered="', 1)[1].split('"', 1)[0]
    ok, total = map(int, rendered.split("/"))
    assert total >= 1 and ok == total, rendered  # every plot thumbnail decoded and laid out
    shot = tmp_path / "index.png"
    subprocess.run([browser, *flags, "--window-size=1280,1000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 1000)
    assert ImageStat.Stat(image).stddev[0] > 10  # not a blank page
