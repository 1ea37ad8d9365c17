"""Tensor names that differ by a prefix: detect it, and map a fine-tune's names onto the base's.

A raw encoder folder (``embeddings.word_embeddings.weight``) and a ``BertForSequenceClassification``
fine-tune of it (``bert.embeddings.word_embeddings.weight`` plus ``classifier.*``) hold the same tensors
under names that differ by ``bert.``. :func:`prefix_hint` names such a prefix in the mismatch error;
``strip_prefix`` / ``add_prefix`` (``--strip-prefix`` / ``--add-prefix``) map the names: with
``strip_prefix`` the fine-tune's tensors outside the prefix (the classifier) are left out, with
``add_prefix`` the base's tensors outside it keep the base's values; either is said in one warning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import Tensor

from weightlab.errors import WeightlabError, warn


def renamer(strip_prefix: str = "", add_prefix: str = "") -> Callable[[str], str | None]:
    """A function from a fine-tune's tensor name to the base's (None: outside ``strip_prefix``, left out)."""

    def rename(key: str) -> str | None:
        if strip_prefix:
            if not key.startswith(strip_prefix):
                return None
            key = key[len(strip_prefix):]
        return add_prefix + key

    return rename


def _prefixes(extra: Iterable[str], known: set[str]) -> Counter:
    found: Counter = Counter()
    for key in extra:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in known:
                found[".".join(parts[:i]) + "."] += 1
                break
    return found


def prefix_hint(base_keys: Iterable[str], other_keys: Iterable[str]) -> str | None:
    """The option that makes ``other``'s names the base's when they differ by a prefix (a phrase), or None."""
    base, other = set(base_keys), set(other_keys)
    strip = _prefixes(sorted(other - base), base)
    add = _prefixes(sorted(base - other), other)
    best = max([("strip", p, n) for p, n in strip.items()] + [("add", p, n) for p, n in add.items()],
               key=lambda item: item[2], default=None)
    if best is None or best[2] < max(1, len(base & other) // 2, min(len(base), len(other)) // 4):
        return None
    how, prefix, _ = best
    if how == "strip":
        return (f"its names carry the prefix {prefix!r} that the base's lack: pass --strip-prefix {prefix} "
                "(strip_prefix in a recipe)")
    return (f"the base's names carry the prefix {prefix!r} that its names lack: pass --add-prefix {prefix} "
            "(add_prefix in a recipe)")


class Renamed:
    """A checkpoint whose tensor names are mapped onto the base's (see the module docstring)."""

    def __init__(self, inner: object, base: object, *, strip_prefix: str = "", add_prefix: str = "") -> None:
        self.inner, self.base = inner, base
        self.path: Path = inner.path  # type: ignore[attr-defined]
        self.is_folder = getattr(inner, "is_folder", False)
        rename = renamer(strip_prefix, add_prefix)
        self.source: dict[str, str] = {}
        left_out = []
        for key in inner.layout:  # type: ignore[attr-defined]
            mapped = rename(key)
            if mapped is None:
                left_out.append(key)
            else:
                self.source[mapped] = key
        where = str(self.path)
        if not self.source:
            raise WeightlabError(f"checkpoint {where!r} has no tensor whose name starts with {strip_prefix!r} "
                                 "(--strip-prefix); expected the prefix its names carry")
        base_layout = base.layout  # type: ignore[attr-defined]
        outside = [k for k in base_layout if add_prefix and not k.startswith(add_prefix)]
        self.from_base = [k for k in outside if k not in self.source]
        if left_out:
            warn(f"checkpoint {where!r}: {len(left_out)} tensor(s) outside the prefix {strip_prefix!r} are left out "
                 f"of the merge (first: {left_out[0]!r})")
        if self.from_base:
            warn(f"checkpoint {where!r} has no counterpart of the base's {len(self.from_base)} tensor(s) outside the "
                 f"prefix {add_prefix!r}; they keep the base's values (first: {self.from_base[0]!r})")
        inner_layout = inner.layout  # type: ignore[attr-defined]
        self.layout = {k: inner_layout[s] for k, s in self.source.items()}
        self.layout.update({k: base_layout[k] for k in self.from_base})

    @property
    def name(self) -> str:
        return self.inner.name  # type: ignore[attr-defined]

    def numel(self, key: str) -> int:
        return self.base.numel(key)  # type: ignore[attr-defined]

    def read(self, key: str) -> Tensor:
        if key in self.source:
            return self.inner.read(self.source[key])  # type: ignore[attr-defined]
        return self.base.read(key)  # type: ignore[attr-defined]

    def files(self) -> list[Path]:
        return self.inner.files()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]
