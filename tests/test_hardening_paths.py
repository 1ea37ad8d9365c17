"""No path read from a file leaves its folder: index shard names, side files, store manifests (``tall-masks``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import save_file

from hardening_fixtures import INDEX, SHARDS, fails, states, tree, write_folder
from weightlab import merging
from weightlab.errors import FormatError
from weightlab.paths import check_file_name, contained


@pytest.mark.parametrize("name", ["../planted.safetensors", "/tmp/abs.safetensors", "a/../../x.safetensors",
                                  "..", "", "C:\\\\evil.safetensors", 3])
def test_contained_refuses_names_that_leave(tmp_path: Path, name: object) -> None:
    with pytest.raises(FormatError, match="source.json"):
        contained(name, tmp_path, source=tmp_path / "source.json")


def test_contained_follows_links(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "inside" / "real.txt").write_text("ok")
    (tmp_path / "inside" / "out").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "inside" / "in").symlink_to(tmp_path / "inside" / "real.txt")
    assert contained("in", tmp_path / "inside", source="x") == tmp_path / "inside" / "in"
    inner = contained("sub/shard.safetensors", tmp_path / "inside", source="x")
    assert inner == tmp_path / "inside" / "sub" / "shard.safetensors"
    with pytest.raises(FormatError, match="outside its folder"):
        contained("out", tmp_path / "inside", source="x")


def test_file_names_must_fit(tmp_path: Path) -> None:
    assert check_file_name("a" * 200, tmp_path, what="task name") == "a" * 200
    with pytest.raises(ValueError, match="300 bytes long; at most 243"):
        check_file_name("a" * 300, tmp_path, what="task name", extra=12)
    with pytest.raises(ValueError, match="plain file name"):
        check_file_name("a/b", tmp_path, what="task name")


def hostile_base(tmp_path: Path, shard_name: str) -> tuple[Path, list[Path]]:
    base, fts = states()
    weight_map = {"embed.weight": shard_name, "head.weight": "model-00002-of-00002.safetensors"}
    base_dir = write_folder(base, tmp_path / "base", weight_map)
    save_file({"embed.weight": base["embed.weight"]}, str((base_dir / shard_name).resolve()))
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    return base_dir, ft_dirs


@pytest.mark.parametrize("shard", ["../planted.safetensors", "ABSOLUTE"])
def test_index_shard_outside_the_folder_is_refused_before_writing(tmp_path: Path, capsys, shard: str) -> None:
    victim = tmp_path / "victim.safetensors"
    shard = str(victim) if shard == "ABSOLUTE" else shard
    base_dir, ft_dirs = hostile_base(tmp_path, shard)
    before = tree(tmp_path)
    victim_bytes = (tmp_path / "base" / shard).resolve().read_bytes()
    fails(["merge", str(base_dir), *map(str, ft_dirs), "--out", str(tmp_path / "o/deeper/merged")], capsys,
          "leaves its folder")
    assert tree(tmp_path) == before  # no o/, no o/deeper/planted.safetensors
    assert (tmp_path / "base" / shard).resolve().read_bytes() == victim_bytes
    fails(["compress", str(base_dir), *map(str, ft_dirs), "--out", str(tmp_path / "store")], capsys,
          "leaves its folder")
    assert tree(tmp_path) == before


def test_shard_symlink_leaving_the_folder_is_refused(tmp_path: Path, capsys) -> None:
    base, fts = states()
    base_dir = write_folder(base, tmp_path / "base")
    shard = next(iter(SHARDS))
    os.replace(base_dir / shard, tmp_path / "elsewhere.safetensors")
    (base_dir / shard).symlink_to(tmp_path / "elsewhere.safetensors")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    fails(["merge", str(base_dir), *map(str, ft_dirs), "--out", str(tmp_path / "m")], capsys, "outside its folder")
    assert not (tmp_path / "m").exists()


def test_side_file_symlink_is_not_copied_out(tmp_path: Path, capsys) -> None:
    base, fts = states()
    base_dir = write_folder(base, tmp_path / "base")
    (tmp_path / "secret.txt").write_text("private")
    (base_dir / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    for cmd in ("merge", "compress"):
        fails([cmd, str(base_dir), *map(str, ft_dirs), "--out", str(tmp_path / "o")], capsys, "tokenizer.json")
        assert not (tmp_path / "o").exists()


def test_a_link_inside_the_folder_is_fine(tmp_path: Path, capsys) -> None:
    base, fts = states()
    base_dir = write_folder(base, tmp_path / "base")
    (base_dir / "generation_config.json").symlink_to(base_dir / "config.json")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    from weightlab.cli import main

    assert main(["merge", str(base_dir), *map(str, ft_dirs), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert (tmp_path / "m" / "generation_config.json").read_text() == '{"model_type": "tiny"}'


def store_with(tmp_path: Path, change) -> Path:
    base, fts = states()
    base_dir = write_folder(base, tmp_path / "base")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    store = tmp_path / "store"
    merging.compress(base_dir, ft_dirs, store)
    manifest = json.loads((store / "store.json").read_text())
    change(manifest, store)
    (store / "store.json").write_text(json.dumps(manifest))
    return store


def test_store_base_index_is_checked_on_extract(tmp_path: Path, capsys) -> None:
    """A store keeps its base folder's index: a hostile one planted there is refused too."""

    def plant(manifest: dict, store: Path) -> None:
        index = store / manifest["base"] / INDEX
        data = json.loads(index.read_text())
        data["weight_map"]["embed.weight"] = "../../../planted.safetensors"
        index.write_text(json.dumps(data))

    store = store_with(tmp_path, plant)
    fails(["extract", str(store), "--task", "ft0", "--out", str(tmp_path / "x/y/z")], capsys, "leaves its folder")
    assert not (tmp_path / "x").exists() and not (tmp_path / "planted.safetensors").exists()
