"""The ``variational-binary-cl`` experiment through the CLI."""

from __future__ import annotations

import json

import pytest

from weightlab.cli import main


@pytest.mark.slow
def test_smoke_profile_runs_and_reports_claims(tmp_path) -> None:
    assert main(["run", "variational-binary-cl", "--profile", "smoke", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["claims"] and all(isinstance(c["held"], bool) for c in results["claims"])


def test_bad_config_values_exit_with_status_2(tmp_path, capsys) -> None:
    assert main(["run", "variational-binary-cl", "--set", "methods=bogus", "--out", str(tmp_path / "a")]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    argv = ["run", "variational-binary-cl", "--set", "meta_values=-1", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "meta_values must be ≥ 0" in capsys.readouterr().err
