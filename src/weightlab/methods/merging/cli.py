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

CHECKPOINTS_HELP = ("BASE then the fine-tuned checkpoints (.safetensors files, Hugging Face model folders or PEFT "
                    "LoRA adapter folders)")
Checkpoints = Annotated[list[Path], typer.Argument(help=CHECKPOINTS_HELP)]
MaybeCheckpoints = Annotated[list[Path] | None, typer.Argument(help=CHECKPOINTS_HELP + "; none with --config")]
Out = Annotated[Path, typer.Option("--out", help="output path (must not exist)")]
Lam = Annotated[
    str, typer.Option("--lam", help="TALL-mask lambda: one value or one per task, comma-separated")
]
Density = Annotated[float, typer.Option(help="fraction kept of each task vector (TIES, DARE, Breadcrumbs), in (0, 1]")]
Scope = Annotated[
    str, typer.Option(help="TIES trimming over the whole model (global) or per tensor (tensor)")
]
StripPrefix = Annotated[str, typer.Option(help="remove this prefix from the fine-tuned models' tensor names "
                                               "(e.g. bert.); their tensors outside it are left out")]
AddPrefix = Annotated[str, typer.Option(help="put this prefix before the fine-tuned models' tensor names")]
Quiet = Annotated[bool, typer.Option(help="no progress bars")]
METHOD_OPTIONS = ["k", "lam", "density", "scope", "weights", "seed", "gamma", "t", "convention"]
FLAGS = ["method", "alpha", *METHOD_OPTIONS, "dtype", "strip_prefix", "add_prefix"]


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise WeightlabError(f"{name} expects numbers separated by commas, got {text!r}") from None
    if not values:
        raise WeightlabError(f"{name} expects at least one number, got {text!r}")
    return values


def _split(checkpoints: list[Path], method: str = "ties") -> tuple[Path, list[Path]]:
    from weightlab.methods.merging.methods import get

    low, high = get(method).models
    if len(checkpoints) < low + 1 or (high is not None and len(checkpoints) > high + 1):
        many = "at least two" if (low, high) == (2, None) else (f"exactly {low}" if low == high else f"at least {low}")
        raise WeightlabError(f"expected BASE and {many} fine-tuned checkpoint{'s' * (high != 1)}"
                             f"{'' if method == 'ties' else f' for {method}'}, got {len(checkpoints)} path(s)")
    return checkpoints[0], checkpoints[1:]


def explicit(ctx: typer.Context, names: Sequence[str]) -> list[str]:
    """The parameters among ``names`` that were given on the command line (not left at their default)."""
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") != "DEFAULT"]


def _sources(paths: Sequence[Path], strip_prefix: str, add_prefix: str) -> list:
    from weightlab.methods.merging.checkpoints import Source

    return [Source(p, strip_prefix, add_prefix) for p in paths]


def _from_recipe(ctx: typer.Context, config: Path, checkpoints: list[Path] | None):
    from weightlab.methods.merging.recipe import load_recipe

    given = explicit(ctx, FLAGS)
    if checkpoints or given:
        extra = " ".join(map(str, checkpoints or [])) or "--" + given[0].replace("_", "-")
        raise WeightlabError(f"--config takes the models, the method and its options from the recipe; remove {extra} "
                             "(only --out, --device and --quiet go with it)")
    return load_recipe(config)


def merge_cmd(
    ctx: typer.Context,
    checkpoints: MaybeCheckpoints = None,
    out: Annotated[Path | None, typer.Option("--out", help="output path (must not exist; required)")] = None,
    config: Annotated[Path | None, typer.Option(help="a merge recipe (mergekit's YAML format) instead of "
                                                     "CHECKPOINTS and the method options")] = None,
    method: Annotated[str, typer.Option(help="task-arithmetic | linear | ties | dare-ta | dare-ties | breadcrumbs | "
                                             "breadcrumbs-ties | slerp | consensus-ta | consensus-ties")] = "ties",
    alpha: Annotated[float, typer.Option(help="scaling of the merged task vector (mergekit's lambda); > 1 "
                                              "amplifies")] = 1.0,
    weights: Annotated[str, typer.Option(help="per-model weights, comma-separated (negative: task negation)")] = "1",
    k: Annotated[int, typer.Option(help="consensus: keep weights used by at least k tasks")] = 2,
    density: Density = 0.2,
    scope: Scope = "global",
    lam: Lam = "0.4",
    seed: Annotated[int, typer.Option(help="DARE: seed of the random drops")] = 0,
    gamma: Annotated[float, typer.Option(help="Breadcrumbs: fraction of largest entries dropped")] = 0.01,
    t: Annotated[float, typer.Option("--t", help="SLERP: position from the base (0) to the model (1)")] = 0.5,
    convention: Annotated[str, typer.Option(help="TIES as the paper's reference code or as mergekit")] = "reference",
    dtype: Annotated[str | None, typer.Option(help="output dtype: float32 | float16 | bfloat16 | float64")] = None,
    device: Annotated[str, typer.Option(help="where the arithmetic runs: cpu | cuda | cuda:N")] = "cpu",
    strip_prefix: StripPrefix = "",
    add_prefix: AddPrefix = "",
    quiet: Quiet = False,
) -> None:
    """Merge fine-tuned checkpoints into one, tensor by tensor (keeps the base's layout), from options or a recipe."""
    from weightlab.methods.merging.config import OPTIONS_USED, MergeConfig, ignored_options
    from weightlab.methods.merging.recipe import MergePlan, run_plan
    from weightlab.report.progress import display

    if config is None and not checkpoints:
        raise WeightlabError("Missing argument 'CHECKPOINTS...' (BASE then the fine-tuned checkpoints), or --config "
                             "RECIPE")
    if out is None:
        raise WeightlabError("Missing option '--out' (the output path, which must not exist)")
    if config is not None:
        plan = _from_recipe(ctx, config, checkpoints)
        described = f"recipe {config}"
    else:
        merge_config = MergeConfig(method=method, alpha=alpha, k=k, density=density, scope=scope,
                                   lambdas=parse_floats(lam, "--lam"), weights=parse_floats(weights, "--weights"),
                                   seed=seed, gamma=gamma, t=t, convention=convention)
        base, fts = _split(list(checkpoints or []), method)
        for option in ignored_options(method, explicit(ctx, METHOD_OPTIONS)):
            larger = f" (and is larger than the {len(fts)} models)" if option == "k" and k > len(fts) else ""
            warn(f"--{option} is ignored by --method {method}{larger}; it is read by "
                 f"{', '.join(m for m, used in OPTIONS_USED.items() if option in used)}")
        plan = MergePlan(base, tuple(_sources(fts, strip_prefix, add_prefix)), merge_config, dtype)
        described = f"{method}, alpha={alpha}" if "alpha" in merge_config.spec.reads else method
    if plan.store_merge is not None and device != "cpu":
        raise WeightlabError(f"a tall-masks store is written on the CPU; remove --device {device}")
    with display(enabled=not quiet):
        path = run_plan(plan, out, device=device)
    kind = "compressed" if plan.store_merge is not None else "merged"
    typer.echo(f"{kind} {len(plan.models)} checkpoints ({described}) into {path}")


def compress_cmd(
    checkpoints: Checkpoints,
    out: Out,
    merge: Annotated[str, typer.Option(help="multi-task vector: task-arithmetic (sum) or ties (disjoint sum)")] = (
        "task-arithmetic"),
    lam: Lam = "0.4",
    density: Density = 0.2,
    scope: Scope = "global",
    names: Annotated[str, typer.Option(help="task names, comma-separated (default: file/folder names)")] = "",
    strip_prefix: StripPrefix = "",
    add_prefix: AddPrefix = "",
    quiet: Quiet = False,
) -> None:
    """Compress fine-tuned checkpoints into a store: base + multi-task vector + one 1-bit mask per task."""
    from weightlab.methods.merging.store import compress, describe_storage
    from weightlab.report.progress import display

    base, fts = _split(checkpoints)
    task_list = [n.strip() for n in names.split(",")] if names else None
    with display(enabled=not quiet):
        manifest = compress(
            base,
            _sources(fts, strip_prefix, add_prefix),
            out,
            merge=merge,
            lambdas=parse_floats(lam, "--lam"),
            density=density,
            scope=scope,
            names=task_list,
        )
    storage = describe_storage(manifest["storage_bits"], len(manifest["tasks"]))
    typer.echo(f"store {out}: tasks {', '.join(manifest['tasks'])}; {storage}")


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
