"""One registry for everything that is looked up by name: experiments, methods, merge methods, ...

    @register("experiment", "forgetting")
    def ...

Names are lowercase; registering the same (kind, name) twice is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from weightlab.errors import WeightlabError, closest

T = TypeVar("T")
_REGISTRY: dict[str, dict[str, Any]] = {}


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
    _load(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        near = ", ".join(closest(name, sorted(table)))
        raise WeightlabError(f"unknown {kind} {name!r}; closest: {near} (see `weightlab list`)")
    return table[name]


def names(kind: str) -> list[str]:
    """All names registered for ``kind``, sorted."""
    _load(kind)
    return sorted(_REGISTRY.get(kind, {}))


def _load(kind: str) -> None:
    # Experiments register themselves on import; import the package lazily so `import weightlab` stays light.
    if kind == "experiment":
        import weightlab.experiments  # noqa: F401
    elif kind == "merge":
        import weightlab.merging  # noqa: F401
