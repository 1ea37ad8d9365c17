"""One registry for everything that is looked up by name: experiments, methods, merge methods, ...

    @register("experiment", "forgetting")
    def ...

Names are lowercase; registering the same (kind, name) twice is an error.

The registry names none of its clients. Packages that register entries declare themselves as entry points in
the group ``weightlab.registry`` (weightlab's own do so in ``pyproject.toml``; a third-party package can add
experiments or merge methods the same way); the first lookup imports every one of them, so what is
registered never depends on what happened to be imported first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from weightlab.errors import WeightlabError, closest

T = TypeVar("T")
ENTRY_POINT_GROUP = "weightlab.registry"
_REGISTRY: dict[str, dict[str, Any]] = {}
_loaded = False


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator that registers ``obj`` under ``(kind, name)``."""
    if name != name.lower():
        raise WeightlabError(f"registry names are lowercase, got {name!r}")

    def deco(obj: T) -> T:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise WeightlabError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return deco


def get(kind: str, name: str) -> Any:
    """The object registered under ``(kind, name)``; the error lists the closest names."""
    load_plugins()
    table = _REGISTRY.get(kind, {})
    if name not in table:
        near = ", ".join(closest(name, sorted(table)))
        raise WeightlabError(f"unknown {kind} {name!r}; closest: {near} (see `weightlab list`)")
    return table[name]


def names(kind: str) -> list[str]:
    """All names registered for ``kind``, sorted."""
    load_plugins()
    return sorted(_REGISTRY.get(kind, {}))


def kinds() -> list[str]:
    """Every kind that has at least one entry."""
    load_plugins()
    return sorted(_REGISTRY)


def load_plugins() -> None:
    """Import every module declared in the ``weightlab.registry`` entry-point group (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    found = entry_points(group=ENTRY_POINT_GROUP)
    if not found:
        raise WeightlabError(
            f"no {ENTRY_POINT_GROUP!r} entry points found: weightlab is not installed "
            "(run `make test` or `pip install -e .`)"
        )
    for ep in sorted(found, key=lambda e: e.name):
        importlib.import_module(ep.value)
