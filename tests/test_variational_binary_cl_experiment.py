"""The ``variational-binary-cl`` experiment through the CLI (its smoke run: tests/test_foundation_conformance.py)."""

from __future__ import annotations

from weightlab.cli import main


def test_bad_config_values_exit_with_status_2(tmp_path, capsys) -> None:
    assert main(["run", "variational-binary-cl", "--set", "methods=bogus", "--out", str(tmp_path / "a")]) == 2
    assert "methods: 'bogus' is not one of variational-task" in capsys.readouterr().err
    argv = ["run", "variational-binary-cl", "--set", "meta_values=-1", "--out", str(tmp_path / "d")]
    assert main(argv) == 2
    assert "meta_values must be ≥ 0, got -1.0" in capsys.readouterr().err
