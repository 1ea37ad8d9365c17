"""Hostile or broken compression stores: one line, exit 2, no output (``tall-masks``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hardening_fixtures import fails, write_files
from weightlab import merging


@pytest.fixture
def store(tmp_path: Path) -> Path:
    base, fts = write_files(tmp_path)
    merging.compress(base, fts, tmp_path / "store", names=["a", "b"])
    return tmp_path / "store"


def edit_manifest(store: Path, change) -> None:
    manifest = json.loads((store / "store.json").read_text())
    manifest = change(manifest)
    (store / "store.json").write_text(json.dumps(manifest))


def with_(key: str, value: object):
    return lambda m: {**m, key: value}


def without(key: str):
    return lambda m: {k: v for k, v in m.items() if k != key}


@pytest.mark.parametrize(("change", "match"), [
    (with_("base", "/etc/passwd"), "leaves its folder"),
    (with_("base", "../../base.safetensors"), "leaves its folder"),
    (lambda m: [m], "expected a JSON object, got list"),
    (without("tasks"), "lacks tasks"),
    (with_("tasks", []), "non-empty list"),
    (with_("tasks", ["a", "../../b"]), "plain file names"),
    (with_("lambdas", []), "one lambda per task (2), got []"),
    (with_("lambdas", [0.4, "x"]), "is not a number"),
    (with_("lambdas", [0.4, -1]), "lambda must be a finite number > 0"),
    (with_("version", 7), "version 7"),
    (without("mask_sha256"), "one digest per task"),
])
def test_bad_manifest(store: Path, tmp_path: Path, capsys, change, match: str) -> None:
    edit_manifest(store, change)
    fails(["extract", str(store), "--task", "a", "--out", str(tmp_path / "x.safetensors")], capsys, match)
    assert not (tmp_path / "x.safetensors").exists()


def test_nan_lambda(store: Path, tmp_path: Path, capsys) -> None:
    edit_manifest(store, with_("lambdas", [float("nan"), 0.4]))  # json writes NaN, which Python's json reads
    fails(["extract", str(store), "--task", "a", "--out", str(tmp_path / "x")], capsys,
          "lambda must be a finite number > 0, got nan")


def test_mask_from_another_store(store: Path, tmp_path: Path, capsys) -> None:
    other_root = tmp_path / "other"
    other_root.mkdir()
    base, fts = write_files(other_root, seed=5)
    merging.compress(tmp_path / "base.safetensors", fts, tmp_path / "store2", names=["a", "b"])
    shutil.copy(tmp_path / "store2" / "masks" / "a.safetensors", store / "masks" / "a.safetensors")
    fails(["extract", str(store), "--task", "a", "--out", str(tmp_path / "x.safetensors")], capsys,
          "is not the mask this store wrote")
    assert not (tmp_path / "x.safetensors").exists()


def test_mask_path_outside_the_store(store: Path, tmp_path: Path, capsys) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(store / "masks" / "a.safetensors", outside)
    (store / "masks" / "a.safetensors").symlink_to(outside)
    fails(["extract", str(store), "--task", "a", "--out", str(tmp_path / "x")], capsys, "outside its folder")


def test_nan_in_tau_leaves_no_output(store: Path, tmp_path: Path, capsys) -> None:
    tau = load_file(str(store / "tau_mtl.safetensors"))
    tau["head.weight"][0, 0] = float("nan")
    save_file(tau, str(store / "tau_mtl.safetensors"))
    before = {p.name for p in tmp_path.iterdir()}
    fails(["extract", str(store), "--task", "b", "--out", str(tmp_path / "x.safetensors")], capsys, "NaN/Inf")
    assert {p.name for p in tmp_path.iterdir()} == before


def test_tau_that_does_not_fit_the_base(store: Path, tmp_path: Path, capsys) -> None:
    tau = load_file(str(store / "tau_mtl.safetensors"))
    tau["head.weight"] = torch.zeros(2, 2)
    save_file(tau, str(store / "tau_mtl.safetensors"))
    fails(["extract", str(store), "--task", "b", "--out", str(tmp_path / "x")], capsys, "does not fit the store's base")


def test_version_1_store_is_still_read(store: Path, tmp_path: Path) -> None:
    edit_manifest(store, lambda m: {**without("mask_sha256")(m), "version": 1})
    from weightlab.cli import main

    assert main(["extract", str(store), "--task", "a", "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 0
