"""Experiment configs: one frozen dataclass per experiment, checked in one place when it is built.

Every config subclasses :class:`ExperimentConfig` (which owns ``seed`` and ``seeds``: the framework runs
seeds ``seed, seed + 1, …, seed + seeds − 1``). Field types carry the checks:

* choices are ``Literal`` (or tuples of ``Literal``): ``methods: tuple[Method, ...]``;
* ranges are ``Annotated`` with a :class:`Range`: ``epochs: Count`` (an int ≥ 1), ``lr: Positive``;
* checks that relate several fields go in the config's ``check()``.

:func:`check_fields` runs on construction (``__post_init__``), so a profile, a ``--set`` override or a test
that builds a config gets the same one-line :class:`WeightlabError` — before any run folder exists.

Naming rule for fields (the same in every experiment): ``<scope>_<quantity>``, scope first and spelled out
(or the paper's acronym: ``at_``, ``qat_``, ``fp_``, ``cga_``, ``sgld_``, ``ewc_``, ``lora_``); a bare
quantity (``epochs``, ``steps``, ``lr``, ``batch_size``) is the experiment's main training phase; ``epochs``
are passes over the data, ``steps`` optimizer steps; choice sets and grids are plural tuples (``methods``,
``variants``, ``corruptions``, ``bits``, ``full_lrs``); a count is ``n_<things>`` where the bare plural would
read as a list (``n_tasks``, ``n_train``) and the plural noun otherwise (``seeds``, ``heads``,
``mc_samples``); ``data`` names the dataset and ``model`` the pretrained network; a symbol of the paper keeps
its letter (``r``, ``beta``, ``eps``, ``k``, ``n``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from weightlab.data.corruptions import CORRUPTIONS
from weightlab.errors import WeightlabError, closest


@dataclass(frozen=True)
class Range:
    """A numeric range for ``Annotated[int | float, Range(...)]`` fields (bounds inclusive unless open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        return f"{'<' if self.hi_open else '≤'} {self.hi:g}"


@dataclass(frozen=True)
class Registered:
    """A ``str`` field naming an entry of the registry (``Annotated[str, Registered("dataset")]``)."""

    kind: str

    def check(self, value: str, name: str) -> None:
        from weightlab import registry

        names = registry.names(self.kind)
        if value not in names:
            raise WeightlabError(f"{name}: unknown {self.kind} {value!r}; expected one of {', '.join(names)} "
                                 f"(closest: {', '.join(closest(value, names))})")

    def describe(self) -> str:
        from weightlab import registry

        return f"(a registered {self.kind}: {', '.join(registry.names(self.kind))})"


Count = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
Positive = Annotated[float, Range(0, lo_open=True)]
NonNegative = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
Fraction = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]
DatasetName = Annotated[str, Registered("dataset")]
Digits = Literal["digits"]  # experiments whose other datasets come with the evidence issues
DigitsSize = Literal[8, 16, 28, 32]  # the sizes weightlab.data.digits comes at (digits.SIZES)
Corruption = Literal[CORRUPTIONS]  # the 15 corruptions of weightlab.data.corruptions
Severity = Literal[1, 2, 3, 4, 5]


@dataclass(frozen=True)
class ExperimentConfig:
    """Base of every experiment config: the seeds the framework runs, and the checks on construction."""

    seed: Annotated[int, Range(0)] = 0
    seeds: Count = 3

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Checks that relate several fields (override; raise :class:`WeightlabError`)."""

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


# ---------------------------------------------------------------------------------------------- checking


def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, with ``Annotated`` constraints kept."""
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(config: Any) -> None:
    """Check every field of the dataclass ``config`` against its annotation (type, choices, range)."""
    hints = field_types(type(config))
    for f in dataclasses.fields(config):
        _check(getattr(config, f.name), hints[f.name], f.name)


def _check(value: Any, annotation: Any, name: str) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        _check(value, args[0], name)
        for meta in args[1:]:
            if isinstance(meta, Range) and not meta.contains(value):
                raise WeightlabError(f"{name} must be {meta.describe()}, got {value!r}")
            if isinstance(meta, Registered):
                meta.check(value, name)
        return
    if origin is typing.Literal:
        if value not in args:
            raise WeightlabError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _check(value, option, name)
            except WeightlabError:
                if len(options) == 1:
                    raise  # Optional[X]: X's own message (its range, its choices)
        raise WeightlabError(f"{name}={value!r}: expected {type_name(annotation)}")
    if origin is tuple:
        if not isinstance(value, tuple):
            raise WeightlabError(f"{name}={value!r}: expected a tuple")
        inner = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(inner) != len(value):
            raise WeightlabError(f"{name}={value!r}: expected {len(inner)} values")
        for item, ann in zip(value, inner, strict=True):
            _check(item, ann, name)
        return
    if annotation is type(None):
        if value is not None:
            raise WeightlabError(f"{name}={value!r}: expected none")
        return
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise WeightlabError(f"{name}={value!r}: expected {type_name(annotation)}")


def type_name(annotation: Any) -> str:
    """A short human name for ``annotation``: ``int ≥ 1``, ``tuple of (finetune | replay)``, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [m.describe() for m in args[1:] if isinstance(m, (Range, Registered))]
        return " ".join([type_name(args[0]), *ranges])
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of ({type_name(args[0])})"
        return f"({', '.join(type_name(a) for a in args)})"
    return getattr(annotation, "__name__", str(annotation))


# ---------------------------------------------------------------------------------------------- parsing


def coerce(value: str, annotation: Any, *, key: str) -> Any:
    """Parse the command-line string ``value`` into ``annotation`` (int, float, bool, str, Literal, tuples).

    Only the type is parsed here; choices and ranges are checked when the config is built.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return coerce(value, args[0], key=key)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in {"none", "null"} and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key=key)
            except WeightlabError:
                continue
        raise WeightlabError(f"--set {key}={value!r}: expected {type_name(annotation)}")
    if origin is typing.Literal:
        for option in args:  # Literal[2, 3] parses "2" as 2
            if str(option) == value:
                return option
        return value  # the check on construction names the choices
    if origin in (tuple, list):
        parts = [p.strip() for p in value.strip("[]()").split(",") if p.strip()]
        inner = args[0] if args else str
        items = [coerce(p, inner, key=key) for p in parts]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        low = value.lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise WeightlabError(f"--set {key}={value!r}: expected a bool (true/false)")
    for kind, label in ((int, "an int"), (float, "a float")):
        if annotation is kind:
            try:
                return kind(value)
            except ValueError:
                raise WeightlabError(f"--set {key}={value!r}: expected {label}") from None
    if annotation is str:
        return value
    raise WeightlabError(f"--set {key}: fields of type {type_name(annotation)} cannot be set from the command line")


def replace_config(config: Any, overrides: dict[str, str]) -> Any:
    """A copy of the dataclass ``config`` with string ``overrides`` parsed to each field's type (and the
    copy checked, as every config is on construction)."""
    hints = field_types(type(config))
    fields = sorted(f.name for f in dataclasses.fields(config))
    parsed: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise WeightlabError(f"unknown --set key {key!r} for {type(config).__name__}; valid keys: "
                                 f"{', '.join(fields)} (closest: {', '.join(closest(key, fields))})")
        parsed[key] = coerce(raw, hints[key], key=key)
    return dataclasses.replace(config, **parsed)


def describe_fields(config_cls: type, profiles: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per ``--set`` key: name, type (with choices and range), the quick default and profile values."""
    hints = field_types(config_cls)
    defaults = config_cls()
    rows = []
    for f in dataclasses.fields(config_cls):
        row = {"key": f.name, "type": type_name(hints[f.name]), "quick (default)": _show(getattr(defaults, f.name))}
        for profile, values in profiles.items():
            row[profile] = _show(values[f.name]) if f.name in values else ""
        rows.append(row)
    return rows


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    return str(value)
