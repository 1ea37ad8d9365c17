"""The ``weightlab`` command line.

Exit status: 0 done; 1 an experiment failed (a traceback: a bug); 2 bad input — an unknown experiment or
option, a value of the wrong type, an existing output folder, an unreadable file, a path that leaves its
folder, an operating-system error (read-only folder, name too long, ...) — always one ``error: ...`` line on
stderr, whichever typer is installed; 130 / 143 interrupted by SIGINT / SIGTERM (``interrupted`` on stderr,
with the ``--resume`` command for ``run``; temporary files are removed on the way out). Warnings about valid
but suspicious input are one ``warning: ...`` line each.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from weightlab.errors import FormatError, WeightlabError, WeightlabWarning

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
    seed: Annotated[int | None, typer.Option(help="base seed")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/NAME/...)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config field: key=value "
                                                   "(`weightlab config NAME` lists the keys)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved config as YAML and create nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    log: Annotated[str | None, typer.Option(help="also log to: tensorboard")] = None,
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
        _interrupt["hint"] = "continue with: " + resume_command(n, profile=profile, seed=seed, out=out,
                                                                sets=set_ or [], log=log, quiet=quiet)
        with display(enabled=not quiet and main_rank):
            path, results = run_experiment(n, profile=profile, seed=seed, out=out, overrides=overrides,
                                           resume=resume, log=log)
        _interrupt["hint"] = None
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


def resume_command(name: str, *, profile: str, seed: int | None, out: Path | None, sets: list[str],
                   log: str | None, quiet: bool) -> str:
    """The command line that continues an interrupted ``weightlab run`` of experiment ``name``."""
    parts = ["weightlab", "run", name, "--profile", profile]
    parts += ["--seed", str(seed)] if seed is not None else []
    parts += ["--out", str(out)] if out is not None else []
    for item in sets:
        parts += ["--set", item]
    parts += ["--log", log] if log else []
    parts += ["--quiet"] if quiet else []
    return shlex.join([*parts, "--resume"])
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
    grid: Annotated[list[str] | None, typer.Option(help="key=v1,v2 (repeatable)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per grid point")] = 1,
    seed: Annotated[int, typer.Option(help="first seed")] = 0,
    profile: Annotated[str, typer.Option(help="smoke | quick | full")] = "quick",
    workers: Annotated[int, typer.Option(help="parallel local worker processes")] = 2,
    ray: Annotated[str | None, typer.Option(help="Ray address (host:port) or 'auto' for a local instance")] = None,
    out: Annotated[Path | None, typer.Option(help="sweep folder (re-use it to resume)")] = None,
    log: Annotated[str | None, typer.Option(help="also log every cell to: tensorboard")] = None,
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
    out: Annotated[Path | None, typer.Option(help="site folder to write (default site/, or none with "
                                             "--markdown)")] = None,
    markdown: Annotated[Path | None, typer.Option(help="also write the claims page, e.g. "
                                                  "docs/results.md")] = None,
) -> None:
    """Write a static HTML report (open OUT/index.html in a browser; no server needed) and/or the results page."""
    from weightlab.report.collect import collect
    from weightlab.report.html import build_site
    from weightlab.report.results_page import write_results_page

    collect(runs_dir)  # every results.json / config.yaml / sweep.json is checked before anything is written
    if markdown is not None:
        console.print(f"[bold green]results page:[/] {write_results_page(runs_dir, markdown)}")
    if out is not None or markdown is None:
        site = out or Path("site")
        created = not site.exists()
        try:
            index = build_site(runs_dir, site)
        except BaseException:
            if created:  # leave no half-written site behind
                shutil.rmtree(site, ignore_errors=True)
            raise
        console.print(f"[bold green]report:[/] {index} (open it in a browser)")


@app.command("show")
def show_cmd(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Print a run's results table and claims."""
    md = run_dir / "results.md"
    if not md.is_file():
        raise WeightlabError(f"{str(run_dir)!r} is not a finished run directory (no results.md)")
    try:
        text = md.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{str(md)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    console.print(Markdown(text))
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


# What the exception classes of typer's click are called depends on the version: click's own up to typer
# 0.2x, typer._click's (vendored) after. Take them from typer's public names, and click's if it is installed.
def _exception_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    usage = {next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")}
    exits, aborts = {typer.Exit}, {typer.Abort}
    with contextlib.suppress(ImportError):
        import click

        usage.add(click.ClickException)
        exits.add(click.exceptions.Exit)
        aborts.add(click.exceptions.Abort)
    return tuple(usage), tuple(exits), tuple(aborts)


USAGE_ERRORS, EXITS, ABORTS = _exception_classes()
_interrupt: dict[str, Any] = {"signal": None, "hint": None}


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (so every ``finally`` and temporary-file cleanup runs);
    the signal is remembered for the exit status, and signals that follow the first one are ignored."""

    def handler(signum: int, frame: Any) -> None:
        if _interrupt["signal"] is None:
            _interrupt["signal"] = signum
            raise KeyboardInterrupt

    _interrupt.update(signal=None, hint=None)
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not in the main thread: leave the signals alone
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    if issubclass(category, WeightlabWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _interrupted() -> int:
    signum = _interrupt["signal"] or signal.SIGINT
    hint = f"; {_interrupt['hint']}" if _interrupt["hint"] else ""
    print(f"interrupted{hint}", file=sys.stderr)
    return 128 + int(signum)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (the console script exits with it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    with _signals_interrupt(), warnings.catch_warnings():
        warnings.simplefilter("always", WeightlabWarning)
        warnings.showwarning = _show_warning
        try:
            _register_extensions()
            if not args:  # the help, and the status of a usage error, on every typer and click
                app(args=["--help"], standalone_mode=False, prog_name="weightlab")
                return 2
            status = app(args=args, standalone_mode=False, prog_name="weightlab")
        except EXITS as exc:
            status = exc.exit_code
        except USAGE_ERRORS as exc:
            message = _one_line(exc.format_message())
            if message:  # (a NoArgsIsHelpError has printed the help already)
                print(f"error: {message}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, *ABORTS):
            return _interrupted()
        except WeightlabError as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return 2
        except OSError as exc:
            where = f" {str(exc.filename)!r}" if exc.filename else ""
            print(f"error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        if _interrupt["signal"] is not None or status == 130:  # typer ≥ 0.2x turns Ctrl-C into Exit(130)
            return _interrupted()
    return status if isinstance(status, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
