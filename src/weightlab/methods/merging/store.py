"""The TALL-mask compression store: θ_0, τ_MTL and one 1-bit mask per task instead of T fine-tuned models.

Format ``weightlab-tall-store``, version 2 — a folder::

    STORE/
      store.json               {"format": "weightlab-tall-store", "version": 2, "tasks": [...],
                                "lambdas": [...],
                                "merge": "task-arithmetic" | "ties" ("ta" in older stores), "density": ...,
                                "scope": ..., "base": "base/<name>",
                                "mask_sha256": {task: hex digest of masks/<task>.safetensors},
                                "storage_bits": {...}}
      base/<name>              the base checkpoint, copied as it was (a .safetensors file or an HF folder)
      tau_mtl.safetensors      the unscaled multi-task vector (float32) of every floating-point key
      masks/<task>.safetensors one uint8 tensor per key: the task's mask packed 1 bit per weight (MSB first,
                               np.packbits order); the key's shape is the base's
      merge_config.yaml        the resolved recipe (``merge_method: tall-masks``) with the inputs' SHA-256

``extract(store, task)`` rebuilds ``θ̂_t = θ_0 + m_t ∘ τ_MTL`` with the base's layout and dtypes, and its
provenance (``merge_config.yaml`` and a model card in a folder, the same recipe in a file's metadata). Every
file is written tensor by tensor, and the store appears atomically (a temporary folder renamed at the end).

A manifest is checked before anything is read through it (:func:`validate_manifest`): every path in it stays
inside the store (:func:`weightlab.paths.contained`), a mask must have the digest the manifest records (a
mask copied from another store is refused), and τ_MTL must be finite. Version 1 stores (no digests) are read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError, warn
from weightlab.methods.merging import methods, provenance
from weightlab.methods.merging.checkpoints import Checkpoint, Source, check_output, open_all, write_like
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.streaming import (
    InputCheck,
    combine,
    global_majority,
    global_thresholds,
    read_vectors,
)
from weightlab.methods.merging.tall_masks import check_lambda
from weightlab.methods.merging.task_arithmetic import check_finite
from weightlab.paths import check_file_name, contained
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.io import atomic_dir, exclusive_output
from weightlab.weights.stream_io import SafetensorsReader, SafetensorsWriter

FORMAT = "weightlab-tall-store"
VERSION = 2
READABLE = (1, 2)  # version 1 has no mask digests
MANIFEST = "store.json"
TAU = "tau_mtl.safetensors"


def storage_bits(
    *, base_bits: int, merged_params: int, n_tasks: int, vector_bits: int = 32
) -> dict[str, float]:
    """Storage as the paper counts it: ``|θ_0|`` + ``|τ_MTL|·32`` + ``T`` masks of 1 bit per merged weight,
    against keeping ``T`` fine-tuned models (``T·|θ_0|``)."""
    tall = base_bits + merged_params * vector_bits + n_tasks * merged_params
    finetuned = n_tasks * base_bits
    return {
        "tall_bits": float(tall),
        "finetuned_bits": float(finetuned),
        "single_model_bits": float(base_bits),
        "ratio": finetuned / tall if tall else math.nan,
    }


def task_names(fts: Sequence[Checkpoint], names: Sequence[str] | None, folder: Path = Path(".")) -> list[str]:
    chosen = list(names) if names else [ft.name for ft in fts]
    if len(chosen) != len(fts):
        raise WeightlabError(f"expected one name per fine-tuned checkpoint ({len(fts)}), got {len(chosen)}")
    return check_task_names(chosen, folder)


def check_task_names(names: object, folder: Path) -> list[str]:
    """Distinct plain file names (``masks/<name>.safetensors`` must fit in ``folder``'s file system)."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise WeightlabError(f"task names must be a non-empty list of strings, got {names!r}")
    bad = [n for n in names if not n or "/" in n or "\\" in n or n.startswith(".")]
    if bad or len(set(names)) != len(names):
        raise WeightlabError(f"task names must be distinct plain file names, got {names} (pass --names a,b,...)")
    for n in names:
        check_file_name(n, folder, what="task name", extra=len(".safetensors"))
    return names


file_sha256 = provenance.file_sha256
MERGES = tuple(m.name for m in methods.TABLE if m.store)  # what a store's multi-task vector can be


def break_even(bits: dict[str, float], n_tasks: int) -> int | None:
    """The fewest tasks for which a store of these models is smaller than the fine-tuned models (None: never)."""
    base = bits["single_model_bits"]
    merged = (bits["tall_bits"] - base) / (32 + n_tasks)  # merged parameters: 32 bits of τ_MTL + 1 per mask
    if base <= merged:
        return None
    return math.floor((base + 32 * merged) / (base - merged)) + 1


def describe_storage(bits: dict[str, float], n_tasks: int) -> str:
    """One phrase comparing a store's size with the fine-tuned models it replaces (smaller or larger)."""
    tall, finetuned, ratio = bits["tall_bits"] / 1e9, bits["finetuned_bits"] / 1e9, bits["ratio"]
    if ratio >= 1:
        return f"{tall:.3f} Gb instead of {finetuned:.3f} Gb for the fine-tuned models ({ratio:.2f}x smaller)"
    return (f"{tall:.3f} Gb, larger than the {finetuned:.3f} Gb of the {n_tasks} fine-tuned models "
            f"({1 / ratio:.2f}x larger)")


def warn_if_larger(bits: dict[str, float], n_tasks: int) -> None:
    """Warn when the store takes more room than the fine-tuned models (too few tasks for the float32 τ_MTL)."""
    if bits["ratio"] >= 1:
        return
    even = break_even(bits, n_tasks)
    when = f"from {even} tasks of these models on" if even else "for no number of tasks of these models"
    warn(f"the store is larger than the {n_tasks} fine-tuned models it replaces ({1 / bits['ratio']:.2f}x): it "
         f"keeps the base and a float32 τ_MTL beside 1-bit masks, which is smaller only {when}")


def compress(
    base: str | Path,
    finetuned: Sequence[str | Path | Source],
    out: str | Path,
    *,
    merge: str = "task-arithmetic",
    lambdas: Sequence[float] = (0.4,),
    density: float = 0.2,
    scope: str = "global",
    names: Sequence[str] | None = None,
    root: Path | None = None,
) -> dict:
    """Write a compression store of ``finetuned`` (see the module docstring); returns its manifest.

    Args:
        merge: the multi-task vector: ``task-arithmetic`` (Σ τ_t) or ``ties`` (the TIES disjoint sum).
        root: the recipe's folder, if any (the store's ``merge_config.yaml`` records paths relative to it).
    """
    if merge not in MERGES:
        raise WeightlabError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    out = check_output(out, [base, *finetuned])
    config = MergeConfig(method=merge, density=density, scope=scope, lambdas=tuple(lambdas))
    base_ckpt, fts = open_all(base, list(finetuned))
    try:
        tasks = task_names(fts, names, out.parent)
        lams = config.lambdas_for(len(fts))
        keys = base_ckpt.float_keys()
        recipe = provenance.store_recipe(base, finetuned, config, tasks, root=root)
        with exclusive_output(out, what="store"):
            manifest = _write_store(base_ckpt, fts, out, config, tasks, lams, keys, recipe)
    finally:
        base_ckpt.close()
        for ft in fts:
            ft.close()
    return manifest


def _write_store(
    base_ckpt: Checkpoint,
    fts: Sequence[Checkpoint],
    out: Path,
    config: MergeConfig,
    tasks: list[str],
    lams: list[float],
    keys: list[str],
    recipe: str,
) -> dict:
    thresholds = majority = None
    if config.uses_ties and config.scope == "global":
        thresholds = global_thresholds(base_ckpt, fts, keys, config.density)
        majority = global_majority(base_ckpt, fts, keys, thresholds)
    check = InputCheck(base_ckpt, fts)
    with atomic_dir(out) as tmp:
        (tmp / "base").mkdir()
        base_rel = f"base/{base_ckpt.path.name}"
        base_ckpt.copy_to(tmp / base_rel)
        (tmp / "masks").mkdir()
        shapes = {k: base_ckpt.layout[k][1] for k in keys}
        tau_writer = SafetensorsWriter(tmp / TAU, {k: (torch.float32, s) for k, s in shapes.items()})
        mask_layout = {k: (torch.uint8, (math.ceil(base_ckpt.numel(k) / 8),)) for k in keys}
        writers = [SafetensorsWriter(tmp / "masks" / f"{t}.safetensors", mask_layout) for t in tasks]
        try:
            for key in track(keys, f"compress {len(tasks)} tasks"):
                _, buf = read_vectors(base_ckpt, fts, key)
                check.observe(buf)
                # the unscaled multi-task vector: TA sum or TIES disjoint *sum* (reference code)
                tau_mtl = combine(buf, config, thresholds=thresholds, majority=majority, reduce="sum")
                tau_writer.write(key, tau_mtl.reshape(shapes[key]))
                for t, writer in enumerate(writers):
                    writer.write(key, merge_ops.pack_bits(merge_ops.tall_mask(buf[t], tau_mtl, lams[t])))
        except BaseException:
            for w in [tau_writer, *writers]:
                w.abort()
            raise
        for w in [tau_writer, *writers]:
            w.close()
        base_bits = sum(
            base_ckpt.numel(k) * dtype.itemsize * 8 for k, (dtype, _) in base_ckpt.layout.items()
        )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tasks": tasks,
            "lambdas": lams,
            "merge": config.method,
            "density": config.density,
            "scope": config.scope,
            "base": base_rel,
            "mask_sha256": {t: file_sha256(tmp / "masks" / f"{t}.safetensors") for t in tasks},
            "storage_bits": storage_bits(
                base_bits=base_bits,
                n_tasks=len(tasks),
                merged_params=sum(base_ckpt.numel(k) for k in keys),
            ),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / provenance.CONFIG).write_text(recipe, encoding="utf-8")
    check.warn()
    warn_if_larger(manifest["storage_bits"], len(tasks))
    return manifest


def read_manifest(store: str | Path) -> dict:
    """The store's manifest, checked (:func:`validate_manifest`)."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise WeightlabError(f"{str(store)!r} is not a weightlab compression store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{str(path)!r} is not valid JSON ({exc})") from None
    return validate_manifest(manifest, Path(store))


def validate_manifest(manifest: object, store: Path) -> dict:
    """Check a parsed ``store.json`` of ``store``: format, version, tasks, lambdas, digests, paths inside."""
    path = store / MANIFEST

    def bad(what: str) -> FormatError:
        return FormatError(f"{str(path)!r}: {what}")

    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
        raise bad(f"format {manifest.get('format')!r} version {manifest.get('version')!r}; expected {FORMAT!r} "
                  f"version {' or '.join(map(str, READABLE))}")
    missing = [k for k in ("tasks", "lambdas", "base") if k not in manifest]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    try:
        tasks = check_task_names(manifest["tasks"], store)
    except WeightlabError as exc:
        raise bad(str(exc)) from None
    lams = manifest["lambdas"]
    if not isinstance(lams, list) or len(lams) != len(tasks):
        raise bad(f"expected one lambda per task ({len(tasks)}), got {lams!r}")
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise bad(f"lambda {lam!r} is not a number")
        check_lambda(lam)
    contained(manifest["base"], store, source=path)
    for name in [TAU, *(f"masks/{t}.safetensors" for t in tasks)]:
        contained(name, store, source=path)
    if manifest["version"] >= 2:
        digests = manifest.get("mask_sha256")
        if not isinstance(digests, dict) or set(digests) != set(tasks):
            raise bad(f"mask_sha256 must give one digest per task ({', '.join(tasks)})")
    return manifest


def check_store_layout(base: Checkpoint, tau: SafetensorsReader, mask: SafetensorsReader) -> None:
    """τ_MTL holds float32 tensors of the base's float keys and shapes; the mask packs each of them."""
    layout = base.layout
    for key, info in tau.tensors.items():
        if key not in layout or info.dtype != "F32" or tuple(info.shape) != tuple(layout[key][1]):
            raise FormatError(f"{str(tau.path)!r}: tensor {key!r} ({info.dtype} {list(info.shape)}) does not fit "
                              "the store's base; expected float32 tensors of the base's shapes")
    if set(mask.tensors) != set(tau.tensors):
        raise FormatError(f"{str(mask.path)!r} masks {len(mask.tensors)} tensors; the store's τ_MTL has "
                          f"{len(tau.tensors)} (a mask from another store?)")
    for key, info in mask.tensors.items():
        if info.dtype != "U8" or tuple(info.shape) != (math.ceil(base.numel(key) / 8),):
            raise FormatError(f"{str(mask.path)!r}: tensor {key!r} ({info.dtype} {list(info.shape)}) is not a "
                              f"packed mask of {base.numel(key)} weights (a mask from another store?)")


def extract(store: str | Path, task: str, out: str | Path) -> Path:
    """Rebuild task ``task``'s model ``θ_0 + m_t ∘ τ_MTL`` from a store into ``out`` (the base's layout)."""
    store = Path(store)
    manifest = read_manifest(store)
    if task not in manifest["tasks"]:
        raise WeightlabError(f"task {task!r} is not in the store; it holds {', '.join(manifest['tasks'])}")
    out = check_output(out, [store])
    mask_path = store / "masks" / f"{task}.safetensors"
    if not mask_path.is_file():
        raise FormatError(f"store {str(store)!r} lists task {task!r} but has no {str(mask_path)!r}")
    if manifest["version"] >= 2 and file_sha256(mask_path) != manifest["mask_sha256"][task]:
        raise FormatError(f"{str(mask_path)!r} is not the mask this store wrote (its SHA-256 differs from the one "
                          f"in {MANIFEST}; copied from another store?)")
    base = Checkpoint(store / manifest["base"])
    readers: list[Checkpoint | SafetensorsReader] = [base]
    try:
        tau = SafetensorsReader(store / TAU)
        readers.append(tau)
        masks = SafetensorsReader(mask_path)
        readers.append(masks)
        check_store_layout(base, tau, masks)
        layout = base.layout

        def produce(key: str) -> Tensor:
            theta0 = base.read(key)
            if key not in tau.tensors:
                return theta0
            vector = tau.read(key)
            check_finite(vector, key, f"store {str(store)!r} (τ_MTL)")
            mask = merge_ops.unpack_bits(masks.read(key), layout[key][1])
            return merge_ops.apply_delta(theta0, vector, 1.0, mask)

        files = provenance.extract_files(store, task, manifest, [store / MANIFEST, store / TAU, mask_path])
        with exclusive_output(out):
            write_like(base, out, produce, description=f"extract {task}", provenance=files)
    finally:
        for r in readers:
            r.close()
    return out
