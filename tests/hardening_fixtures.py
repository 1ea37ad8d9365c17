"""Tiny checkpoints for the hardening tests (imported by tests/test_hardening_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlab.cli import main

SHARDS = {"model-00001-of-00002.safetensors": ["embed.weight"], "model-00002-of-00002.safetensors": ["head.weight"]}
INDEX = "model.safetensors.index.json"


def states(n_tasks: int = 2, seed: int = 0, size: int = 8) -> tuple[dict, list[dict]]:
    """A base state dict and ``n_tasks`` fine-tunes of it (float32, two keys)."""
    gen = torch.Generator().manual_seed(seed)
    base = {"embed.weight": torch.randn(size, 4, generator=gen), "head.weight": torch.randn(3, size, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(n_tasks)]
    return base, fts


def write_folder(state: dict, path: Path, weight_map: dict | None = None) -> Path:
    """A sharded Hugging Face model folder (two shards, an index and a config.json)."""
    path.mkdir(parents=True)
    for shard, keys in SHARDS.items():
        save_file({k: state[k] for k in keys}, str(path / shard))
    weight_map = weight_map or {k: s for s, ks in SHARDS.items() for k in ks}
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text('{"model_type": "tiny"}')
    return path


def write_files(root: Path, n_tasks: int = 2, **kwargs: int) -> tuple[Path, list[Path]]:
    """``root/base.safetensors`` and ``root/ft<i>.safetensors``."""
    base, fts = states(n_tasks, **kwargs)
    save_file(base, str(root / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        save_file(ft, str(root / f"ft{i}.safetensors"))
        paths.append(root / f"ft{i}.safetensors")
    return root / "base.safetensors", paths


def fails(args: list[str], capsys: pytest.CaptureFixture[str], match: str, status: int = 2) -> str:
    """Run the CLI in-process; assert the status and one ``error:`` line on stderr containing ``match``."""
    assert main(args) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    assert "Traceback" not in err
    return err


def tree(folder: Path) -> set[str]:
    """Every path below ``folder``, hidden ones included (relative, as strings)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}
