"""Command-line tools for real checkpoints: ``weightlab merge``, ``compress`` and ``extract``.

Registered into the main ``weightlab`` app by :func:`register` (declared as an entry point in the group
``weightlab.commands``, see ``weightlab.cli``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from weightlab.errors import WeightlabError, warn

Checkpoints = Annotated[
    list[Path],
    typer.Argument(
        help="BASE then the fine-tuned checkpoints (.safetensors files or Hugging Face model folders)"
    ),
]
Out = Annotated[Path, typer.Option("--out", help="output path (must not exist)")]
Lam = Annotated[
    str, typer.Option("--lam", help="TALL-mask lambda: one value or one per task, comma-separated")
]
Density = Annotated[float, typer.Option(help="TIES trim density in (0, 1]")]
Scope = Annotated[
    str, typer.Option(help="TIES trimming over the whole model (global) or per tensor (tensor)")
]
Quiet = Annotated[bool, typer.Option(help="no progress bars")]


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise WeightlabError(f"{name} expects numbers separated by commas, got {text!r}") from None
    if not values:
        raise WeightlabError(f"{name} expects at least one number, got {text!r}")
    return values


def _split(checkpoints: list[Path]) -> tuple[Path, list[Path]]:
    if len(checkpoints) < 3:
        raise WeightlabError(
            f"expected BASE and at least two fine-tuned checkpoints, got {len(checkpoints)} path(s)"
        )
    return checkpoints[0], checkpoints[1:]


def explicit(ctx: typer.Context, names: Sequence[str]) -> list[str]:
    """The parameters among ``names`` that were given on the command line (not left at their default)."""
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") != "DEFAULT"]


def merge_cmd(
    ctx: typer.Context,
    checkpoints: Checkpoints,
    out: Out,
    method: Annotated[
        str, typer.Option(help="task-arithmetic | ties | consensus-ta | consensus-ties")
    ] = "ties",
    alpha: Annotated[float, typer.Option(help="scaling of the merged task vector, in (0, 1]")] = 1.0,
    k: Annotated[int, typer.Option(help="consensus: keep weights used by at least k tasks")] = 2,
    density: Density = 0.2,
    scope: Scope = "global",
    lam: Lam = "0.4",
    quiet: Quiet = False,
) -> None:
    """Merge fine-tuned checkpoints into one, tensor by tensor (keeps the base's layout and dtypes)."""
    from weightlab.methods.merging.streaming import OPTIONS_USED, MergeConfig, ignored_options, merge_checkpoints
    from weightlab.report.progress import display

    config = MergeConfig(
        method=method, alpha=alpha, k=k, density=density, scope=scope, lambdas=parse_floats(lam, "--lam")
    )
    base, fts = _split(checkpoints)
    for option in ignored_options(method, explicit(ctx, ["k", "lam", "density", "scope"])):
        larger = f" (and is larger than the {len(fts)} models)" if option == "k" and k > len(fts) else ""
        warn(f"--{option} is ignored by --method {method}{larger}; it is read by "
             f"{', '.join(m for m, used in OPTIONS_USED.items() if option in used)}")
    with display(enabled=not quiet):
        path = merge_checkpoints(base, fts, out, config)
    typer.echo(f"merged {len(fts)} checkpoints ({method}, alpha={alpha}) into {path}")


def compress_cmd(
    checkpoints: Checkpoints,
    out: Out,
    merge: Annotated[str, typer.Option(help="multi-task vector: ta (sum) or ties (disjoint sum)")] = "ta",
    lam: Lam = "0.4",
    density: Density = 0.2,
    scope: Scope = "global",
    names: Annotated[str, typer.Option(help="task names, comma-separated (default: file/folder names)")] = "",
    quiet: Quiet = False,
) -> None:
    """Compress fine-tuned checkpoints into a store: base + multi-task vector + one 1-bit mask per task."""
    from weightlab.methods.merging.store import compress
    from weightlab.report.progress import display

    base, fts = _split(checkpoints)
    task_list = [n.strip() for n in names.split(",")] if names else None
    with display(enabled=not quiet):
        manifest = compress(
            base,
            fts,
            out,
            merge=merge,
            lambdas=parse_floats(lam, "--lam"),
            density=density,
            scope=scope,
            names=task_list,
        )
    bits = manifest["storage_bits"]
    typer.echo(
        f"store {out}: tasks {', '.join(manifest['tasks'])}; {bits['tall_bits'] / 1e9:.3f} Gb instead of "
        f"{bits['finetuned_bits'] / 1e9:.3f} Gb for the fine-tuned models ({bits['ratio']:.2f}x smaller)"
    )


def extract_cmd(
    store: Annotated[Path, typer.Argument(help="a store written by `weightlab compress`")],
    task: Annotated[str, typer.Option(help="the task to rebuild")],
    out: Out,
    quiet: Quiet = False,
) -> None:
    """Rebuild one task's model θ_0 + m_t ∘ τ_MTL from a compression store."""
    from weightlab.methods.merging.store import extract, read_manifest
    from weightlab.report.progress import display

    with display(enabled=not quiet):
        path = extract(store, task, out)
    manifest = read_manifest(store)
    lam = manifest["lambdas"][manifest["tasks"].index(task)]
    typer.echo(f"extracted task {task!r} (lambda={json.dumps(lam)}) into {path}")


def register(app: typer.Typer) -> None:
    """Add ``merge``, ``compress`` and ``extract`` to the ``weightlab`` app (idempotent)."""
    known = {c.name for c in app.registered_commands}
    for name, fn in (("merge", merge_cmd), ("compress", compress_cmd), ("extract", extract_cmd)):
        if name not in known:
            app.command(name)(fn)
