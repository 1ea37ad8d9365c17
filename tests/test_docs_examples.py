"""Every ```python block of the documentation pages below runs as written.

A block runs in a fresh namespace unless the line just above its fence is ``<!-- continues -->``: then it runs
in the namespace of the block before it (the page says so in words too). Blocks run in order, in a temporary
working directory, with the default seed fixture of ``conftest.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/lift.md", "docs/quantization.md", "docs/test_time_adaptation.md", "docs/callbacks.md",
         "docs/merging.md"]
CONTINUES = "<!-- continues -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One ```python block: its source, the line its code starts on, and whether it continues the last one."""

    code: str
    line: int
    continues: bool


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append(Block(match.group(1), line, before == CONTINUES))
    return blocks


def run_page(path: Path) -> int:
    """Execute the blocks of ``path``; returns how many ran. A failure names the page and the line."""
    namespace: dict[str, object] = {}
    blocks = python_blocks(path.read_text())
    for block in blocks:
        if not block.continues:
            namespace = {"__name__": f"docs_{path.stem}"}
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        exec(code, namespace)
    return len(blocks)


def test_blocks_are_found_with_their_continuation_marks() -> None:
    text = "x\n```python\na = 1\n```\n\n<!-- continues -->\n```python\nb = a\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [Block("a = 1\n", 3, False), Block("b = a\n", 8, True)]


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_runs(page: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / page) >= 1
