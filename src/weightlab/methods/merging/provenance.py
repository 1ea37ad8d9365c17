"""Provenance of merged, extracted and compressed checkpoints: ``merge_config.yaml`` and a short model card.

``merge_config.yaml`` is the *resolved* recipe, in the recipe format ``weightlab merge --config`` reads
(:mod:`weightlab.methods.merging.recipe`): the method, every option it read (per-model weights, densities
and λ, α, k, the seed, ...), the dtype, and under ``provenance`` the tool and each input's path with the
SHA-256 of its files. Run again from the folder its paths are relative to, it gives the same tensors. A
single-file output carries the same text in its safetensors metadata (key ``merge_config``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

from weightlab.methods.merging.checkpoints import Source, as_source

CONFIG = "merge_config.yaml"
CARD = "README.md"
SKIPPED = {CONFIG, CARD}  # provenance files of an input that is itself a merge do not identify its weights
PER_MODEL = {"weights": "weight", "density": "density", "lam": "lam"}  # option -> per-model recipe name


def tool() -> str:
    try:
        return f"weightlab {version('weightlab')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "weightlab"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest(path: Path) -> str | dict[str, str] | None:
    """The SHA-256 of a file, or of each file of a folder (by name); None for a path that does not exist."""
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return {p.name: file_sha256(p) for p in sorted(path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name not in SKIPPED}
    return None


def shown(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` (the recipe's folder) when given, else as it was given."""
    return os.path.relpath(path, root) if root is not None else str(path)


def resolved_recipe(
    base: str | Path,
    finetuned: Sequence[str | Path | Source],
    config: object,
    *,
    dtype: torch.dtype | None = None,
    root: Path | None = None,
) -> dict:
    """The merge as a recipe dict: only the options ``config.method`` reads, resolved per model."""
    sources = [as_source(f) for f in finetuned]
    n, reads = len(sources), config.spec.reads  # type: ignore[attr-defined]
    per_model = {
        "weights": config.weights_for(n) if "weights" in reads else None,  # type: ignore[attr-defined]
        "density": config.densities_for(n) if "density" in reads else None,  # type: ignore[attr-defined]
        "lam": config.lambdas_for(n) if "lam" in reads else None,  # type: ignore[attr-defined]
    }
    models = []
    for t, s in enumerate(sources):
        entry: dict = {"model": shown(s.path, root)}
        params = {PER_MODEL[o]: v[t] for o, v in per_model.items() if v is not None}
        if params:
            entry["parameters"] = params
        for option in ("strip_prefix", "add_prefix"):
            if getattr(s, option):
                entry[option] = getattr(s, option)
        models.append(entry)
    shared = {"alpha": "alpha", "k": "k", "scope": "scope", "seed": "seed", "gamma": "gamma", "t": "t",
              "normalize": "normalized", "rescale": "rescale", "convention": "convention"}
    parameters = {name: getattr(config, attr) for name, attr in shared.items() if name in reads}
    recipe: dict = {"merge_method": config.method, "base_model": shown(Path(base), root),  # type: ignore[attr-defined]
                    "models": models, "parameters": parameters}
    if dtype is not None:
        recipe["dtype"] = str(dtype).replace("torch.", "")
    return recipe


def with_provenance(recipe: dict, inputs: Sequence[Path], root: Path | None) -> dict:
    """``recipe`` with a ``provenance`` section: the tool and the SHA-256 of every input."""
    return {**recipe, "provenance": {
        "created_by": tool(),
        "paths_relative_to": str(root.resolve()) if root is not None else str(Path.cwd()),
        "inputs": [{"path": shown(p, root), "sha256": digest(p)} for p in inputs],
    }}


def render(recipe: Mapping) -> str:
    header = ("# The resolved recipe of this merge, written by weightlab. Run it again with\n"
              "#   weightlab merge --config merge_config.yaml --out OTHER\n"
              "# from a copy in the folder named by provenance.paths_relative_to.\n")
    return header + yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True)


def model_card(recipe: Mapping, title: str = "Merged model") -> str:
    """A short Hugging Face model card: front matter, the method, the models and their parameters."""
    models = recipe.get("models", [])
    rows = "\n".join(f"| `{m['model']}` | {', '.join(f'{k}={v}' for k, v in m.get('parameters', {}).items())} |"
                     for m in models)
    options = ", ".join(f"{k}={v}" for k, v in recipe.get("parameters", {}).items()) or "none"
    front = yaml.safe_dump({"base_model": recipe.get("base_model"), "tags": ["merge", "weightlab",
                                                                             str(recipe.get("merge_method"))]},
                           sort_keys=False)
    return (f"---\n{front}---\n\n# {title}\n\nMade with `weightlab merge`, method **{recipe.get('merge_method')}**, "
            f"on the base `{recipe.get('base_model')}`.\n\n| model | parameters |\n|---|---|\n{rows}\n\n"
            f"Options: {options}. The full recipe, with the SHA-256 of every input, is in `{CONFIG}`.\n")


def merge_files(
    base: str | Path,
    finetuned: Sequence[str | Path | Source],
    config: object,
    *,
    dtype: torch.dtype | None = None,
    root: Path | None = None,
) -> dict[str, str]:
    """``merge_config.yaml`` and ``README.md`` of a merge (file name -> text)."""
    recipe = resolved_recipe(base, finetuned, config, dtype=dtype, root=root)
    inputs = [Path(base), *(as_source(f).path for f in finetuned)]
    full = with_provenance(recipe, list(dict.fromkeys(inputs)), root)
    return {CONFIG: render(full), CARD: model_card(full)}


def store_recipe(
    base: str | Path,
    finetuned: Sequence[str | Path | Source],
    config: object,
    tasks: Sequence[str],
    *,
    root: Path | None = None,
) -> str:
    """The ``merge_config.yaml`` of a compression store: a ``tall-masks`` recipe that writes it again."""
    sources = [as_source(f) for f in finetuned]
    lams = config.lambdas_for(len(sources))  # type: ignore[attr-defined]
    models = [{"model": shown(s.path, root), "name": name, "parameters": {"lam": lam}}
              for s, name, lam in zip(sources, tasks, lams)]
    parameters: dict = {"merge": config.method}  # type: ignore[attr-defined]
    if config.method == "ties":  # type: ignore[attr-defined]
        parameters.update(density=config.density, scope=config.scope)  # type: ignore[attr-defined]
    recipe = {"merge_method": "tall-masks", "base_model": shown(Path(base), root), "models": models,
              "parameters": parameters}
    inputs = list(dict.fromkeys([Path(base), *(s.path for s in sources)]))
    return render(with_provenance(recipe, inputs, root))


def extract_files(store: Path, task: str, manifest: Mapping, inputs: Sequence[Path]) -> dict[str, str]:
    """``merge_config.yaml`` and ``README.md`` of a model extracted from a store."""
    lam = manifest["lambdas"][manifest["tasks"].index(task)]
    parameters = {"merge": manifest.get("merge"), "density": manifest.get("density"), "scope": manifest.get("scope")}
    record = {"merge_method": "tall-masks", "extract": {"store": str(store), "task": task, "lam": lam},
              "parameters": parameters, "provenance": {
                  "created_by": tool(), "inputs": [{"path": str(p), "sha256": digest(p)} for p in inputs]}}
    header = f"# Extracted with `weightlab extract {store} --task {task}`: θ_0 + m_t ∘ τ_MTL of that task.\n"
    text = header + yaml.safe_dump(record, sort_keys=False, allow_unicode=True)
    card = model_card({"merge_method": "tall-masks", "base_model": manifest.get("base"),
                       "models": [{"model": task, "parameters": {"lam": lam}}], "parameters": parameters},
                      title=f"Task {task!r} extracted from a TALL-mask store")
    return {CONFIG: text, CARD: card}
