"""The ``weightlab`` command line.

Bad input (an unknown experiment, an unknown ``--set`` key, a value of the wrong type, an existing output
folder, an unreadable file, ...) ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from weightlab.errors import WeightlabError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="weightlab: find, protect, merge, patch and quantize what a network knows in its weights.")
console = Console()
err_console = Console(stderr=True)


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WeightlabError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


@app.command("list")
def list_cmd() -> None:
    """List the registered experiments."""
    from weightlab import registry

    table = Table("experiment", "paper key", "what it shows")
    for name in registry.names("experiment"):
        spec = registry.get("experiment", name)
        table.add_row(name, spec.paper, spec.summary)
    console.print(table)


@app.command("run")
def run_cmd(
    name: Annotated[str, typer.Argument(help="experiment name, or 'all'")],
    profile: Annotated[str, typer.Option(help="smoke | quick | full")] = "quick",
    seed: Annotated[int | None, typer.Option(help="base seed")] = None,  # noqa: UP007
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/NAME/...)")] = None,  # noqa: UP007
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config field: key=value "  # noqa: UP007
                                                   "(`weightlab config NAME` lists the keys)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved config as YAML and create nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    log: Annotated[str | None, typer.Option(help="also log to: tensorboard")] = None,  # noqa: UP007
) -> None:
    """Run an experiment (or all of them) and write its run directory (works under torchrun too)."""
    from weightlab import distributed, registry
    from weightlab.experiments.base import claim_rows, config_yaml, get, run_experiment
    from weightlab.report.progress import display
    from weightlab.report.tables import markdown_table
    from weightlab.weights.io import write_text_atomic

    overrides = parse_sets(set_ or [])
    names = registry.names("experiment") if name == "all" else [name]
    if name == "all" and (overrides or out):
        raise WeightlabError("`run all` takes no --set or --out (each experiment has its own config and folder)")
    configs = {n: get(n).resolve(profile, seed=seed, overrides=overrides) for n in names}  # all checked first
    if dry_run:
        print("\n---\n".join(config_yaml(get(n), c, profile) for n, c in configs.items()), end="")
        return
    distributed.init_from_env()
    main_rank = distributed.is_main()
    summary = []
    for n in names:
        with display(enabled=not quiet and main_rank):
            path, results = run_experiment(n, profile=profile, seed=seed, out=out, overrides=overrides,
                                           resume=resume, log=log)
        if not main_rank:
            continue
        rows = claim_rows(results.claims)
        console.print(Markdown(f"## {n}: claims\n\n" + markdown_table(rows)))
        console.print(f"[bold green]results:[/] {path}")
        summary += [{"experiment": n, **row} for row in rows]
    if name == "all" and main_rank:
        text = markdown_table(summary)
        write_text_atomic(Path("runs") / f"summary-{profile}.md", "# Claims\n\n" + text)
        console.print(Markdown(text))
        console.print(f"[bold green]summary:[/] {Path('runs') / f'summary-{profile}.md'}")


@app.command("config")
def config_cmd(name: Annotated[str, typer.Argument(help="experiment name")]) -> None:
    """List an experiment's --set keys: type (choices, range), the quick default and the profiles' values."""
    from weightlab.experiments.base import get
    from weightlab.experiments.configs import describe_fields

    spec = get(name)
    rows = describe_fields(spec.config, spec.profiles)
    table = Table(*rows[0], title=f"{name}: --set KEY=VALUE (tuples: comma-separated)")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


@app.command("sweep")
def sweep_cmd(
    name: Annotated[str, typer.Argument(help="experiment name")],
    grid: Annotated[list[str] | None, typer.Option(help="key=v1,v2 (repeatable)")] = None,  # noqa: UP007
    seeds: Annotated[int, typer.Option(help="seeds per grid point")] = 1,
    seed: Annotated[int, typer.Option(help="first seed")] = 0,
    profile: Annotated[str, typer.Option(help="smoke | quick | full")] = "quick",
    workers: Annotated[int, typer.Option(help="parallel local worker processes")] = 2,
    ray: Annotated[str | None, typer.Option(help="Ray address (host:port) or 'auto' for a local instance")] = None,  # noqa: UP007
    out: Annotated[Path | None, typer.Option(help="sweep folder (re-use it to resume)")] = None,  # noqa: UP007
    log: Annotated[str | None, typer.Option(help="also log every cell to: tensorboard")] = None,  # noqa: UP007
) -> None:
    """Run a grid of config values × seeds; every cell is an ordinary run directory."""
    from weightlab.sweep import parse_grid, run_sweep

    path, rows = run_sweep(name, parse_grid(grid or []), seeds=seeds, profile=profile, workers=workers,
                           ray_address=ray, out=out, base_seed=seed, log=log)
    console.print(Markdown((path / "sweep.md").read_text()))
    console.print(f"[bold green]sweep:[/] {path}")


@app.command("report")
def report_cmd(
    runs_dir: Annotated[Path, typer.Argument(help="a folder of runs and sweeps (e.g. runs/)")],
    out: Annotated[Path | None, typer.Option(help="site folder to write (default site/, or none with "  # noqa: UP007
                                             "--markdown)")] = None,
    markdown: Annotated[Path | None, typer.Option(help="also write the claims page, e.g. "  # noqa: UP007
                                                  "docs/results.md")] = None,
) -> None:
    """Write a static HTML report (open OUT/index.html in a browser; no server needed) and/or the results page."""
    from weightlab.report.html import build_site
    from weightlab.report.results_page import write_results_page

    if markdown is not None:
        console.print(f"[bold green]results page:[/] {write_results_page(runs_dir, markdown)}")
    if out is not None or markdown is None:
        index = build_site(runs_dir, out or Path("site"))
        console.print(f"[bold green]report:[/] {index} (open it in a browser)")


@app.command("show")
def show_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print a run's results table and claims."""
    md = run_dir / "results.md"
    if not md.is_file():
        raise WeightlabError(f"{str(run_dir)!r} is not a finished run directory (no results.md)")
    console.print(Markdown(md.read_text()))
    plots = sorted((run_dir / "plots").glob("*.png"))
    if plots:
        console.print("plots: " + ", ".join(str(p) for p in plots))


# Modules that add commands to `app` (e.g. merge / compress / extract) with a `register(app)` function are
# declared as entry points in the group ``weightlab.commands`` (pyproject.toml), so the CLI names none of them.
COMMANDS_GROUP = "weightlab.commands"
_extended = False


def _register_extensions() -> None:
    import importlib
    from importlib.metadata import entry_points

    global _extended
    if _extended:
        return
    _extended = True
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        importlib.import_module(ep.value).register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (the console script exits with it)."""
    _register_extensions()
    try:
        app(args=argv, standalone_mode=False, prog_name="weightlab")
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except WeightlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
