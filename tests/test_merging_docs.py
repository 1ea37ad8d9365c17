"""The recipes and shell commands of docs/merging.md run as written (its Python blocks: test_docs_examples.py)."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlab.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "merging.md"
FOLDERS = ["models/base", "models/math", "models/code", "models/chat", "base", "ft-math", "ft-code", "ft-chat"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", PAGE.read_text(), re.DOTALL | re.MULTILINE)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folders the page's examples name: a base and three fine-tunes, twice (tiny HF folders)."""
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    base = {"encoder.weight": torch.randn(8, 6, generator=gen), "encoder.bias": torch.randn(8, generator=gen)}
    for i, name in enumerate(FOLDERS):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        tuned = i % 4 != 0  # models/base and base/ are the base
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if tuned else v for k, v in base.items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return tmp_path


def test_every_recipe_of_the_page_runs(workdir: Path, capsys) -> None:
    recipes = blocks("yaml")
    assert len(recipes) >= 3
    for i, text in enumerate(recipes):
        (workdir / f"r{i}.yml").write_text(text)
        assert main(["merge", "--config", f"r{i}.yml", "--out", f"out{i}", "--quiet"]) == 0, capsys.readouterr().err
        assert (workdir / f"out{i}" / "merge_config.yaml").is_file()


def test_every_shell_command_of_the_page_runs(workdir: Path, capsys) -> None:
    commands = [line.split(" #")[0] for block in blocks("bash") for line in block.splitlines()
                if line.startswith("weightlab ")]
    assert len(commands) >= 8
    for command in commands:
        args = [a for word in shlex.split(command)[1:] for a in (sorted(glob.glob(word)) if "*" in word else [word])]
        assert main([*args, "--quiet"]) == 0, (command, capsys.readouterr().err)
