"""The registry is filled by the packages themselves (entry points), whatever was imported first."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import weightlab.registry as registry_module
from weightlab import registry

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


# ------------------------------------------------------------------------------------------- methods by name

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
NO_METHOD_CLASS = {  # paper keys whose code is not one class or prepare() to look up, and why
    "rws": "pure functions over state dicts (extract_signature, patch, unpatch)",
    "scole": "the key names a stream (data.scenarios); its strategies register as group-masking, frequency-replay",
}


def _paper_key_rows() -> dict[str, set[str]]:
    """Paper key → the ``methods/<package>/`` folders its row of the architecture map names."""
    text = ARCHITECTURE.read_text()
    table = text[text.index("## Find a method by its paper key"):]
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]*) \|", table, flags=re.M)
    return {key: set(re.findall(r"methods/(\w+)/", code)) for key, code in rows}


def test_every_paper_key_with_a_method_class_is_registered() -> None:
    rows = _paper_key_rows()
    assert len(rows) == 12 and NO_METHOD_CLASS.keys() <= rows.keys()
    names = set(registry.names("method"))
    assert rows.keys() - NO_METHOD_CLASS.keys() - names == set()
    for key in rows.keys() - NO_METHOD_CLASS.keys():
        package = registry.get("method", key).__module__.split(".")[2]  # weightlab.methods.<package>.<module>
        assert package in rows[key], f"{key} is registered from methods/{package}/, its docs row names {rows[key]}"

