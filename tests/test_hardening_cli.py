"""The CLI's exit-code promise: usage errors, OS errors and warnings are one line each, on any typer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from hardening_fixtures import fails, states, write_files, write_folder
from weightlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def typer_lower_bound() -> tuple[int, ...]:
    found = re.search(r'"typer>=([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml must give typer a lower bound"
    return tuple(int(p) for p in found[1].split("."))


def test_installed_typer_is_in_the_tested_range() -> None:
    installed = tuple(int(p) for p in re.findall(r"\d+", typer.__version__)[:3])
    assert installed >= typer_lower_bound()
    expected = os.environ.get("WEIGHTLAB_EXPECT_TYPER")  # set by `make test-typer-oldest`
    if expected:
        assert typer.__version__ == expected


@pytest.mark.parametrize(("args", "match"), [
    (["run", "forgetting", "--profle", "smoke"], "--profile"),  # typer's suggestion
    (["merge"], "Missing argument"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["run", "forgetting", "--seed", "abc"], "Invalid value for '--seed'"),
    (["merge", "a", "b", "c", "--out", "o", "--alpha", "x"], "Invalid value for '--alpha'"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, args: list[str], match: str) -> None:
    fails(args, capsys, match)


def test_usage_error_from_the_console_script() -> None:
    proc = subprocess.run([sys.executable, "-m", "weightlab", "run", "forgetting", "--profle", "smoke"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--profile" in proc.stderr


def test_no_command_shows_the_help_with_status_2(capsys) -> None:
    assert main([]) == 2
    assert "merge" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ OS errors


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write: read-only (chmod) for a user, immutable (chattr +i) or /sys for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        yield Path("/sys")


@pytest.mark.parametrize("where", ["unwritable", "sys"])
def test_out_in_a_folder_that_cannot_be_written(tmp_path: Path, capsys, unwritable: Path, where: str) -> None:
    base, fts = write_files(tmp_path)
    folder = unwritable if where == "unwritable" else Path("/sys")
    for out in (folder / "merged.safetensors", folder / "deeper" / "merged.safetensors"):
        fails(["merge", str(base), *map(str, fts), "--out", str(out)], capsys, "expected a folder you can write")


def test_out_under_a_regular_file(tmp_path: Path, capsys) -> None:
    base, fts = write_files(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    fails(["merge", str(base), *map(str, fts), "--out", str(tmp_path / "file.txt" / "sub" / "m")], capsys,
          "Not a directory")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_names_and_outputs_too_long_for_the_file_system(tmp_path: Path, capsys) -> None:
    base, fts = write_files(tmp_path)
    before = set(tmp_path.iterdir())
    fails(["compress", str(base), *map(str, fts), "--names", "a" * 300 + ",b", "--out", str(tmp_path / "s")],
          capsys, "task name 'aaaa")
    fails(["merge", str(base), *map(str, fts), "--out", str(tmp_path / ("m" * 250))], capsys, "bytes long")
    assert set(tmp_path.iterdir()) == before


def test_compress_out_inside_the_base_folder(tmp_path: Path, capsys) -> None:
    base, fts = states()
    base_dir = write_folder(base, tmp_path / "base")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    before = {p.name for p in base_dir.iterdir()}
    for cmd in ("compress", "merge"):
        fails([cmd, str(base_dir), *map(str, ft_dirs), "--out", str(base_dir / "store")], capsys,
              "is inside the input folder")
    assert {p.name for p in base_dir.iterdir()} == before


def test_show_on_a_file_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    (tmp_path / "results.md").write_bytes(b"# results\n\xff\xfe broken")
    fails(["show", str(tmp_path)], capsys, "is not UTF-8 text (byte 0xff at offset 10)")


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"tables": {}}', "'claims' must be a list of objects with 'text'"),
    ('{"claims": [{"text": "t", "measured": [1]}]}', "a claim's 'measured' must be an object"),
])
def test_report_on_a_malformed_results_file(tmp_path: Path, capsys, content: str, match: str) -> None:
    run = tmp_path / "runs" / "x" / "run1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(content)
    fails(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "site")], capsys, match)
    assert not (tmp_path / "site").exists()


def test_report_on_a_malformed_config_or_sweep(tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "run1"
    run.mkdir(parents=True)
    (run / "results.json").write_text('{"claims": []}')
    (run / "config.yaml").write_bytes(b"experiment: [unclosed")
    fails(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "site")], capsys, "is not valid YAML")
    (run / "config.yaml").write_text("experiment: x")
    (tmp_path / "runs" / "sweep.json").write_text('{"cells": {}}')
    site_args = ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "site")]
    fails(site_args, capsys, "'cells' must be a list of objects")
    assert not (tmp_path / "site").exists()


def test_sweep_with_an_unknown_logger_runs_no_cell(tmp_path: Path, capsys) -> None:
    fails(["sweep", "forgetting", "--profile", "smoke", "--log", "wandb", "--out", str(tmp_path / "sw")], capsys,
          "unknown --log 'wandb'; expected one of tensorboard")
    assert not (tmp_path / "sw").exists()


def interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from weightlab.experiments.base import run_experiment
    from weightlab.runs import RunContext

    original = RunContext.save_state

    def crash_after_two(self, *args, **kwargs):
        if self.saves == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("forgetting", profile="smoke", out=tmp_path / "cut", overrides=SETS)
    monkeypatch.setattr(RunContext, "save_state", original)
    return tmp_path / "cut"


SETS = {"methods": "finetune", "epochs": "1"}


@pytest.mark.parametrize(("tensors", "meta", "match"), [
    ({"nope": [0.0]}, {"rows": [[0.5]] * 2}, "does not fit this run"),
    ({"nope": [0.0]}, None, "has no weightlab metadata"),
])
def test_resume_from_a_checkpoint_with_the_wrong_keys(tmp_path, monkeypatch, capsys, tensors, meta, match) -> None:
    import torch
    from safetensors.torch import save_file

    run = interrupted_run(tmp_path, monkeypatch)
    (checkpoint,) = (run / "checkpoints").glob("*.safetensors")
    save_file({k: torch.tensor(v) for k, v in tensors.items()}, str(checkpoint),
              metadata={"weightlab": json.dumps(meta)} if meta is not None else None)
    args = ["run", "forgetting", "--profile", "smoke", "--out", str(run), "--resume", "--quiet"]
    fails(args + [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")], capsys, match)


# ------------------------------------------------------------------------------------------ warnings


def warnings_of(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main([*args, "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines), lines
    return lines


def test_warnings_on_suspicious_inputs(tmp_path: Path, capsys) -> None:
    base, fts = write_files(tmp_path, n_tasks=3)
    shutil.copy(fts[0], tmp_path / "copy.safetensors")
    shutil.copy(base, tmp_path / "same-as-base.safetensors")
    out = iter(tmp_path / f"o{i}.safetensors" for i in range(10))
    assert warnings_of(["merge", str(base), *map(str, fts), "--out", str(next(out))], capsys) == []
    (line,) = warnings_of(["merge", str(base), str(fts[0]), str(fts[0]), "--out", str(next(out))], capsys)
    assert "is given twice (tasks 1 and 2)" in line
    (line,) = warnings_of(["merge", str(base), str(fts[0]), str(tmp_path / "copy.safetensors"), "--out",
                           str(next(out))], capsys)
    assert "are identical; each counts as a task" in line
    (line,) = warnings_of(["merge", str(base), str(fts[0]), str(tmp_path / "same-as-base.safetensors"), "--out",
                           str(next(out))], capsys)
    assert "same-as-base.safetensors' is identical to the base" in line
    (line,) = warnings_of(["merge", str(base), str(fts[0]), str(base), "--out", str(next(out))], capsys)
    assert "is the base itself" in line
    lines = warnings_of(["merge", str(base), *map(str, fts[:2]), "--method", "ties", "--k", "5", "--lam", "0.3",
                         "--out", str(next(out))], capsys)
    assert lines == [
        "warning: --k is ignored by --method ties (and is larger than the 2 models); it is read by consensus-ta, "
        "consensus-ties",
        "warning: --lam is ignored by --method ties; it is read by consensus-ta, consensus-ties"]
    (line,) = warnings_of(["merge", str(base), *map(str, fts), "--method", "task-arithmetic", "--density", "0.5",
                           "--out", str(next(out))], capsys)
    assert "--density is ignored by --method task-arithmetic" in line
    assert warnings_of(["merge", str(base), *map(str, fts), "--method", "consensus-ta", "--k", "3", "--lam", "0.3",
                        "--out", str(next(out))], capsys) == []
    line, size = warnings_of(["compress", str(base), str(fts[0]), str(fts[0]), "--names", "a,b", "--out",
                              str(tmp_path / "store")], capsys)
    assert "is given twice" in line
    assert "the store is larger than the 2 fine-tuned models it replaces" in size  # two float32 tasks
