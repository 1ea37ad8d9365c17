"""Merge recipes: mergekit's YAML format where it overlaps, for every method of the table and the TALL store.

    merge_method: ties                 # a weightlab name (dare-ties) or mergekit's (dare_ties)
    base_model: models/base            # paths relative to the recipe's folder, and inside it
    models:
      - model: models/math
        parameters: {weight: 1.0, density: 0.5}
      - model: models/code
        parameters: {weight: -0.5, density: 0.5}   # negative weight: task negation
    parameters: {lambda: 1.2, normalize: true}     # lambda (mergekit) = alpha (weightlab), may exceed 1
    dtype: bfloat16

Options a method shares with mergekit default to mergekit's values (``ties`` follows mergekit's convention,
``density`` 1, ``normalize`` per method), so a mergekit recipe gives mergekit's tensors. A recipe is checked
before anything is read: unknown keys, values of the wrong type, per-layer gradients or filters, and paths
that leave the recipe's folder (:func:`weightlab.paths.contained`) each give a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from weightlab.errors import WeightlabError, closest, warn
from weightlab.methods.merging import methods
from weightlab.methods.merging.checkpoints import DTYPE_NAMES, Source
from weightlab.methods.merging.config import MergeConfig
from weightlab.paths import contained

STORE = "tall-masks"  # a recipe with this method writes a compression store (weightlab compress)
TOP = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "strip_prefix", "add_prefix",
       "provenance")
MERGEKIT_ONLY = ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template")
MODEL_KEYS = ("model", "parameters", "strip_prefix", "add_prefix", "name")
PER_MODEL = {"weight": "weights", "density": "density", "lam": "lam"}  # recipe name -> option read
NUMBER, INTEGER, FLAG, WORD = "a number", "an integer", "true or false", "a string"
GLOBAL = {"alpha": NUMBER, "lambda": NUMBER, "k": INTEGER, "scope": WORD, "seed": INTEGER, "gamma": NUMBER,
          "t": NUMBER, "normalize": FLAG, "rescale": FLAG, "convention": WORD, "int8_mask": FLAG, "merge": WORD}
KINDS = {**GLOBAL, "weight": NUMBER, "density": NUMBER, "lam": NUMBER}
NO_EFFECT = {"int8_mask"}  # mergekit memory options: accepted, same tensors
SHARED = ("k", "scope", "seed", "gamma", "t", "normalize", "rescale", "convention")  # MergeConfig fields, as named
STORE_READS = frozenset({"lam", "merge", "density", "scope"})


@dataclass(frozen=True)
class MergePlan:
    """A resolved merge: what ``weightlab merge`` runs, from a recipe or from the command line."""

    base: Path
    models: tuple[Source, ...]
    config: MergeConfig
    dtype: str | None = None
    root: Path | None = None  # the recipe's folder (paths in the provenance are relative to it)
    store_merge: str | None = None  # tall-masks: the multi-task vector of the store
    names: tuple[str, ...] | None = field(default=None)  # tall-masks: task names


def _fail(recipe: Path, what: str) -> WeightlabError:
    return WeightlabError(f"recipe {str(recipe)!r}: {what}")


def read_recipe(path: str | Path) -> dict:
    """The parsed recipe (a mapping), or a one-line error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightlabError(f"cannot read recipe {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _fail(path, f"not valid YAML{where}: {problem}") from None
    if not isinstance(recipe, dict):
        raise _fail(path, f"expected a mapping with merge_method and models, got {type(recipe).__name__}")
    return recipe


def _check_keys(recipe: Path, where: str, found: dict, allowed: tuple[str, ...]) -> None:
    for key in found:
        if key in MERGEKIT_ONLY:
            raise _fail(recipe, f"{key!r} (a mergekit feature) is not supported; weightlab merges whole models "
                                "listed under models:")
        if key not in allowed:
            raise _fail(recipe, f"unknown key {key!r} in {where}; expected one of {', '.join(allowed)} (closest: "
                                f"{', '.join(closest(str(key), list(allowed)))})")


def _value(recipe: Path, where: str, name: str, value: object) -> object:
    kind = KINDS.get(name)
    if kind is None:
        raise _fail(recipe, f"unknown parameter {name!r} in {where}; expected one of {', '.join(KINDS)} (closest: "
                            f"{', '.join(closest(str(name), list(KINDS)))})")
    if isinstance(value, (list, dict)):
        raise _fail(recipe, f"{where}.{name} is a list or mapping (a per-layer gradient or filter); weightlab takes "
                            "one value per parameter")
    ok = {NUMBER: isinstance(value, (int, float)) and not isinstance(value, bool),
          INTEGER: isinstance(value, int) and not isinstance(value, bool),
          FLAG: isinstance(value, bool), WORD: isinstance(value, str)}[kind]
    if not ok:
        raise _fail(recipe, f"{where}.{name} must be {kind}, got {value!r}")
    return value


def _parameters(recipe: Path, where: str, section: object, *, per_model: bool) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise _fail(recipe, f"{where} must be a mapping of parameter names to values, got {section!r}")
    out = {str(k): _value(recipe, where, str(k), v) for k, v in section.items()}
    shared = [k for k in out if k in GLOBAL]
    if per_model and shared:
        raise _fail(recipe, f"{where}.{shared[0]} is one value for the whole merge; put it in the top-level "
                            "parameters")
    return out


def _path(recipe: Path, where: str, value: object) -> Path:
    if not isinstance(value, str):
        raise _fail(recipe, f"{where} must be a path (a string), got {value!r}")
    return contained(value, recipe.parent, source=recipe)


def _prefix(recipe: Path, where: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(recipe, f"{where} must be a string, got {value!r}")
    return value


def _method(recipe: Path, name: object) -> str:
    if not isinstance(name, str):
        raise _fail(recipe, f"merge_method must be a string, got {name!r}")
    if name == STORE or name in methods.NAMES:
        return name
    if name in methods.MERGEKIT_NAMES:
        return methods.MERGEKIT_NAMES[name]
    choices = [*methods.NAMES, STORE, *methods.MERGEKIT_NAMES]
    near = ", ".join(closest(name, choices))
    raise _fail(recipe, f"unknown merge_method {name!r}; expected one of {', '.join(methods.NAMES)}, {STORE} (or "
                        f"mergekit's {', '.join(methods.MERGEKIT_NAMES)}); closest: {near}")


def _dtype(recipe: Path, found: dict) -> str | None:
    name = found.get("out_dtype", found.get("dtype"))
    if name is None:
        return None
    if not isinstance(name, str) or name.removeprefix("torch.") not in DTYPE_NAMES:
        raise _fail(recipe, f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return name.removeprefix("torch.")


def load_recipe(path: str | Path) -> MergePlan:
    """Read and check a recipe; returns the plan ``weightlab merge --config`` runs."""
    recipe = Path(path)
    found = read_recipe(recipe)
    _check_keys(recipe, "the recipe", found, TOP)
    for required in ("merge_method", "models"):
        if required not in found:
            raise _fail(recipe, f"lacks {required}")
    method = _method(recipe, found["merge_method"])
    entries = found["models"]
    if not isinstance(entries, list) or not entries:
        raise _fail(recipe, f"models must be a non-empty list of {{model: PATH, parameters: ...}}, got {entries!r}")
    shared = _parameters(recipe, "parameters", found.get("parameters"), per_model=False)
    prefixes = {k: _prefix(recipe, k, found[k]) for k in ("strip_prefix", "add_prefix") if k in found}
    base = _path(recipe, "base_model", found["base_model"]) if found.get("base_model") is not None else None
    models, per_model, names = [], [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise _fail(recipe, f"{where} must be a mapping with a model: path, got {entry!r}")
        _check_keys(recipe, where, entry, MODEL_KEYS)
        model = _path(recipe, f"{where}.model", entry["model"])
        if base is not None and method != "linear" and model.resolve() == base.resolve():
            continue  # the base among the models: its task vector is 0 (mergekit leaves it out too)
        own = {k: _prefix(recipe, f"{where}.{k}", entry[k]) for k in ("strip_prefix", "add_prefix") if k in entry}
        models.append(Source(model, **{**prefixes, **own}))
        per_model.append(_parameters(recipe, f"{where}.parameters", entry.get("parameters"), per_model=True))
        names.append(entry.get("name"))
    if base is None:
        if method != "linear":
            raise _fail(recipe, f"{method} needs a base_model (only linear works without one)")
        base = models[0].path
    if "provenance" in found:
        check_provenance(recipe, found["provenance"])
    return _plan(recipe, method, base, models, shared, per_model, names, _dtype(recipe, found))


def _store_merge(recipe: Path, shared: dict) -> str:
    """The multi-task vector of a tall-masks store: a table method usable as a store's τ_MTL."""
    name = shared.get("merge", "task-arithmetic")
    name = methods.MERGEKIT_NAMES.get(name, name)
    usable = [m.name for m in methods.TABLE if m.store]
    if name not in usable:
        raise _fail(recipe, f"parameters.merge must be one of {', '.join(usable)} for {STORE}, got {name!r}")
    return name


def _plan(recipe: Path, method: str, base: Path, models: list[Source], shared: dict, per_model: list[dict],
          names: list, dtype: str | None) -> MergePlan:
    if "alpha" in shared and "lambda" in shared:
        raise _fail(recipe, "parameters give both alpha and lambda (the same scaling; mergekit calls it lambda)")
    store = method == STORE
    merge = _store_merge(recipe, shared) if store else method
    reads = STORE_READS if store else methods.get(merge).reads
    defaults = {} if store else dict(methods.get(merge).recipe_defaults)
    for name in sorted((set(shared) | {k for p in per_model for k in p}) - NO_EFFECT):
        option = PER_MODEL.get(name, "alpha" if name == "lambda" else name)
        if option not in reads:
            users = methods.readers(option) + ([STORE] if option in STORE_READS else [])
            warn(f"recipe {str(recipe)!r}: parameter {name!r} is not read by {method}; it is read by "
                 f"{', '.join(users) or 'no method'}")

    def per(name: str, fallback: object) -> tuple:
        return tuple(p.get(name, shared.get(name, fallback)) for p in per_model)

    density = shared.get("density", defaults.get("density", MergeConfig.density))
    options = {k: shared.get(k, defaults.get(k)) for k in SHARED if k in shared or k in defaults}
    config = MergeConfig(method=merge, alpha=shared.get("alpha", shared.get("lambda", 1.0)),
                         weights=per("weight", 1.0) or (1.0,), density=density, densities=per("density", density),
                         lambdas=per("lam", MergeConfig.lambdas[0]) or MergeConfig.lambdas, **options)
    if any(n is not None and not isinstance(n, str) for n in names):
        raise _fail(recipe, f"a model's name must be a string, got {names}")
    if not store:
        if any(n is not None for n in names):
            raise _fail(recipe, f"models[].name is read by {STORE} only (task names of a store)")
        return MergePlan(base, tuple(models), config, dtype, recipe.parent)
    task_names = tuple(names) if names and all(n is not None for n in names) else None
    return MergePlan(base, tuple(models), config, dtype, recipe.parent, store_merge=merge, names=task_names)


def check_provenance(recipe: Path, section: object) -> None:
    """Warn when an input recorded in a ``provenance`` section (merge_config.yaml) has changed since."""
    from weightlab.methods.merging.provenance import digest

    inputs = section.get("inputs", []) if isinstance(section, dict) else None
    if not isinstance(inputs, list):
        raise _fail(recipe, "provenance must be a mapping with a list of inputs (as merge_config.yaml writes it)")
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise _fail(recipe, f"provenance.inputs holds {item!r}; expected {{path: ..., sha256: ...}}")
        path = contained(item["path"], recipe.parent, source=recipe)
        if path.exists() and digest(path) != item.get("sha256"):
            warn(f"recipe {str(recipe)!r}: input {item['path']!r} has changed since the recipe was written (its "
                 "SHA-256 differs from provenance.inputs)")


def run_plan(plan: MergePlan, out: str | Path, *, device: str = "cpu") -> Path:
    """Run a plan: a merge into ``out`` (with its provenance), or a compression store for ``tall-masks``."""
    if plan.store_merge is not None:
        from weightlab.methods.merging.store import compress

        if plan.dtype is not None:
            raise WeightlabError(f"{STORE} keeps the base as it is and τ_MTL in float32; remove dtype from the recipe")
        compress(plan.base, plan.models, out, merge=plan.store_merge, lambdas=plan.config.lambdas,
                 density=plan.config.density, scope=plan.config.scope, names=plan.names, root=plan.root)
        return Path(out)
    from weightlab.methods.merging.execute import merge_checkpoints

    return merge_checkpoints(plan.base, plan.models, out, plan.config, dtype=plan.dtype, device=device,
                             root=plan.root)
