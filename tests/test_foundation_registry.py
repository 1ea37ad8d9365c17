"""The registry is filled by the packages themselves (entry points), whatever was imported first."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import weightlab.registry as registry_module

SNIPPET = """
import json, sys
{first}
from weightlab import registry
print(json.dumps({{k: registry.names(k) for k in ("experiment", "merge", "method")}}))
"""


def _names_after(first_import: str) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(first=first_import)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_registered_names_do_not_depend_on_import_order() -> None:
    plain = _names_after("")
    assert plain == _names_after("import weightlab.methods.merging.tall_masks")
    assert plain == _names_after("import weightlab.experiments.forgetting")
    assert "tall-masks" in plain["method"] and "ties" in plain["merge"] and "forgetting" in plain["experiment"]


def test_registry_module_imports_none_of_its_clients() -> None:
    tree = ast.parse(Path(registry_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("weightlab")} == {"weightlab.errors"}
