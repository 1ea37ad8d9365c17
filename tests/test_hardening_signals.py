"""Ctrl-C, SIGTERM and kill -9 with real signals and subprocesses: exit 130/143, no temporaries left behind,
stale ones recognised, concurrent writers of one --out refused, an interrupted run resumable."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hardening_fixtures import fails, states, tree, write_folder
from weightlab.cli import main
from weightlab.errors import WeightlabWarning
from weightlab.weights.io import STALE_AFTER_S, exclusive_output, remove_stale_temporaries

# A weightlab process that pauses at a known point and says so on stdout, so the signal lands mid-write.
SLOW = """
import sys, time
import weightlab.{module} as target
original = target.{name}
def slow(*args, **kwargs):
    out = original(*args, **kwargs)
    print("busy", flush=True)
    time.sleep(0.4)
    return out
target.{name} = slow
from weightlab.cli import main
from weightlab.errors import WeightlabWarning
sys.exit(main(sys.argv[1:]))
"""


def start_slow(module: str, name: str, args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW.format(module=module, name=name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "busy", proc.communicate(timeout=60)
    return proc


@pytest.fixture
def folders(tmp_path: Path) -> list[str]:
    base, fts = states(3, size=16)
    return [str(write_folder(s, tmp_path / name)) for name, s in zip(["base", "a", "b", "c"], [base, *fts])]


def merge_args(folders: list[str], out: Path) -> list[str]:
    return ["merge", *folders, "--method", "ties", "--scope", "tensor", "--out", str(out), "--quiet"]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_merge_exits_and_removes_temporaries(tmp_path: Path, capsys, folders, sig, status) -> None:
    out = tmp_path / "out" / "merged"
    before = tree(tmp_path)
    proc = start_slow("weights.merge_ops", "apply_delta", merge_args(folders, out))
    assert any(p.startswith("out/.merged.") and p.endswith(".tmp") for p in tree(tmp_path))  # mid-write
    # a second merge to the same --out while the first runs is refused (exit 2), and leaves the first alone
    fails(merge_args(folders, out), capsys, "another process is writing output")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert tree(tmp_path) == before  # no merged, no .merged.*.tmp, no lock, no empty out/
    assert main(merge_args(folders, out)) == 0  # and the next merge simply works


def test_stale_temporaries_after_kill_9_are_removed_by_the_next_merge(tmp_path: Path, capsys, folders) -> None:
    out = tmp_path / "merged"
    proc = start_slow("weights.merge_ops", "apply_delta", merge_args(folders, out))
    proc.kill()
    proc.communicate(timeout=60)
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.") and p.name.endswith(".tmp")]
    assert main(merge_args(folders, out)) == 0
    assert "changed 0 s ago" in capsys.readouterr().err  # too fresh to be sure: left alone, and said so
    old = time.time() - STALE_AFTER_S - 5
    for p in [stale, *stale.rglob("*")]:
        os.utime(p, (old, old))
    out2 = tmp_path / "again"
    out.rename(out2)
    assert main(merge_args(folders, out)) == 0
    err = capsys.readouterr().err
    assert f"removed {str(stale)!r}" in err and "a temporary left by an interrupted write to 'merged'" in err
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []


def test_only_our_own_temporaries_are_recognised(tmp_path: Path) -> None:
    old = time.time() - 3600
    for name in (".merged.abcd1234.tmp", ".merged-x.abcd1234.tmp", ".merged.abc.tmp", "merged.abcd1234.tmp"):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old, old))
    with pytest.warns(WeightlabWarning, match="removed .*merged.abcd1234.tmp' \\(0.0 MB\\)"), \
            exclusive_output(tmp_path / "merged"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged-x.abcd1234.tmp", ".merged.abc.tmp",
                                                           "merged.abcd1234.tmp"]
    assert remove_stale_temporaries(tmp_path / "merged") == []


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_run_prints_the_resume_command(tmp_path: Path, sig, status) -> None:
    out = tmp_path / "run"
    args = ["run", "forgetting", "--profile", "smoke", "--out", str(out), "--set", "methods=finetune", "--set",
            "epochs=1", "--quiet"]
    proc = start_slow("runs", "RunContext.save_state", args)  # paused after a checkpoint
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    expected = shlex.join(["weightlab", *args[:2], "--profile", "smoke", "--out", str(out), "--set",
                           "methods=finetune", "--set", "epochs=1", "--quiet", "--resume"])
    assert last == f"interrupted; continue with: {expected}"
    assert (out / "config.yaml").is_file() and not (out / "results.json").exists()
    if sig == signal.SIGINT:  # the printed command continues the run to its end
        assert main(shlex.split(expected)[1:]) == 0
        assert (out / "results.json").is_file()
