"""Small shared helpers: seeding, device choice, config coercion."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import types
import typing
from typing import Any

import numpy as np
import torch

from weightlab.errors import WeightlabError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *keys: object) -> int:
    """A seed derived from ``seed`` and ``keys`` (stable across processes and Python versions).

    Continual runs re-seed every experience with ``derive_seed(seed, method, index)``, which is what makes a
    resumed run end with exactly the numbers of an uninterrupted one.
    """
    text = "/".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def choose_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise WeightlabError(f"device {device!r} is not a valid torch device "
                             "(expected auto, cpu, cuda, cuda:N)") from exc


# ---------------------------------------------------------------------------------------------- config


def coerce(value: str, annotation: Any, *, key: str) -> Any:
    """Parse the command-line string ``value`` into ``annotation`` (int, float, bool, str, tuples, lists).

    Raises :class:`WeightlabError` naming ``key`` and the expected type when it does not parse.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in {"none", "null"} and type(None) in args:
            return None
        for a in non_none:
            try:
                return coerce(value, a, key=key)
            except WeightlabError:
                continue
        raise WeightlabError(f"--set {key}={value!r}: expected {_type_name(annotation)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise WeightlabError(f"--set {key}={value!r}: expected one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = [p for p in value.strip("[]()").split(",") if p.strip()]
        inner = args[0] if args else str
        items = [coerce(p.strip(), inner, key=key) for p in parts]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        low = value.lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise WeightlabError(f"--set {key}={value!r}: expected a bool (true/false)")
    if annotation is int:
        try:
            return int(value)
        except ValueError:
            raise WeightlabError(f"--set {key}={value!r}: expected an int") from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise WeightlabError(f"--set {key}={value!r}: expected a float") from None
    if annotation is str:
        return value
    raise WeightlabError(f"--set {key}: fields of type {_type_name(annotation)} cannot be set from the command line")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def replace_config(config: Any, overrides: dict[str, str]) -> Any:
    """A copy of the dataclass ``config`` with string ``overrides`` parsed to each field's type."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    parsed: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            from weightlab.errors import closest

            raise WeightlabError(
                f"unknown --set key {key!r} for {type(config).__name__}; valid keys: {', '.join(sorted(fields))}"
                f" (closest: {', '.join(closest(key, sorted(fields)))})"
            )
        parsed[key] = coerce(raw, hints[key], key=key)
    return dataclasses.replace(config, **parsed)
