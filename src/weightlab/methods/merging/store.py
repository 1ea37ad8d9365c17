"""The TALL-mask compression store: θ_0, τ_MTL and one 1-bit mask per task instead of T fine-tuned models.

Format ``weightlab-tall-store``, version 1 — a folder::

    STORE/
      store.json               {"format": "weightlab-tall-store", "version": 1, "tasks": [...],
                                "lambdas": [...],
                                "merge": "ta" | "ties", "density": ..., "scope": ..., "base": "base/<name>",
                                "storage_bits": {...}}
      base/<name>              the base checkpoint, copied as it was (a .safetensors file or an HF folder)
      tau_mtl.safetensors      the unscaled multi-task vector (float32) of every floating-point key
      masks/<task>.safetensors one uint8 tensor per key: the task's mask packed 1 bit per weight (MSB first,
                               np.packbits order); the key's shape is the base's

``extract(store, task)`` rebuilds ``θ̂_t = θ_0 + m_t ∘ τ_MTL`` with the base's layout and dtypes. Every file is
written tensor by tensor, and the store appears atomically (a temporary folder renamed at the end).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError
from weightlab.methods.merging.checkpoints import Checkpoint, check_output, open_all, write_like
from weightlab.methods.merging.streaming import (
    MergeConfig,
    combine,
    global_majority,
    global_thresholds,
    read_vectors,
)
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.stream_io import SafetensorsReader, SafetensorsWriter, atomic_dir

FORMAT = "weightlab-tall-store"
VERSION = 1
MANIFEST = "store.json"


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


def task_names(fts: Sequence[Checkpoint], names: Sequence[str] | None) -> list[str]:
    chosen = list(names) if names else [ft.name for ft in fts]
    if len(chosen) != len(fts):
        raise WeightlabError(f"expected one name per fine-tuned checkpoint ({len(fts)}), got {len(chosen)}")
    bad = [n for n in chosen if not n or "/" in n or n.startswith(".")]
    if bad or len(set(chosen)) != len(chosen):
        raise WeightlabError(
            f"task names must be distinct plain file names, got {chosen} (pass --names a,b,...)"
        )
    return chosen


def compress(
    base: str | Path,
    finetuned: Sequence[str | Path],
    out: str | Path,
    *,
    merge: str = "ta",
    lambdas: Sequence[float] = (0.4,),
    density: float = 0.2,
    scope: str = "global",
    names: Sequence[str] | None = None,
) -> dict:
    """Write a compression store of ``finetuned`` (see the module docstring); returns its manifest."""
    if merge not in ("ta", "ties"):
        raise WeightlabError(f"merge must be 'ta' or 'ties', got {merge!r}")
    out = check_output(out)
    config = MergeConfig(
        method="ties" if merge == "ties" else "task-arithmetic",
        density=density,
        scope=scope,
        lambdas=tuple(lambdas),
    )
    base_ckpt, fts = open_all(base, list(finetuned))
    tasks = task_names(fts, names)
    lams = config.lambdas_for(len(fts))
    keys = base_ckpt.float_keys()
    try:
        thresholds = majority = None
        if config.uses_ties and scope == "global":
            thresholds = global_thresholds(base_ckpt, fts, keys, density)
            majority = global_majority(base_ckpt, fts, keys, thresholds)
        with atomic_dir(out) as tmp:
            (tmp / "base").mkdir()
            base_rel = f"base/{base_ckpt.path.name}"
            copy = shutil.copytree if base_ckpt.is_folder else shutil.copy2
            copy(base_ckpt.path, tmp / base_rel)
            (tmp / "masks").mkdir()
            shapes = {k: base_ckpt.layout[k][1] for k in keys}
            tau_writer = SafetensorsWriter(
                tmp / "tau_mtl.safetensors", {k: (torch.float32, s) for k, s in shapes.items()}
            )
            mask_layout = {k: (torch.uint8, (math.ceil(base_ckpt.numel(k) / 8),)) for k in keys}
            writers = [SafetensorsWriter(tmp / "masks" / f"{t}.safetensors", mask_layout) for t in tasks]
            try:
                for key in track(keys, f"compress {len(tasks)} tasks"):
                    _, buf = read_vectors(base_ckpt, fts, key)
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
                "merge": merge,
                "density": density,
                "scope": scope,
                "base": base_rel,
                "storage_bits": storage_bits(
                    base_bits=base_bits,
                    n_tasks=len(tasks),
                    merged_params=sum(base_ckpt.numel(k) for k in keys),
                ),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    finally:
        base_ckpt.close()
        for ft in fts:
            ft.close()
    return manifest


def read_manifest(store: str | Path) -> dict:
    """The store's manifest (format and version checked)."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise WeightlabError(f"{str(store)!r} is not a weightlab compression store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise FormatError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise FormatError(
            f"{str(path)!r} has format {manifest.get('format')!r} version {manifest.get('version')!r};"
            f" expected {FORMAT!r} version {VERSION}"
        )
    return manifest


def extract(store: str | Path, task: str, out: str | Path) -> Path:
    """Rebuild task ``task``'s model ``θ_0 + m_t ∘ τ_MTL`` from a store into ``out`` (the base's layout)."""
    store = Path(store)
    manifest = read_manifest(store)
    if task not in manifest["tasks"]:
        raise WeightlabError(f"task {task!r} is not in the store; it holds {', '.join(manifest['tasks'])}")
    out = check_output(out)
    base = Checkpoint(store / manifest["base"])
    tau = SafetensorsReader(store / "tau_mtl.safetensors")
    masks = SafetensorsReader(store / "masks" / f"{task}.safetensors")
    layout = base.layout

    def produce(key: str) -> Tensor:
        theta0 = base.read(key)
        if key not in tau.tensors:
            return theta0
        mask = merge_ops.unpack_bits(masks.read(key), layout[key][1])
        return merge_ops.apply_delta(theta0, tau.read(key), 1.0, mask)

    try:
        write_like(base, out, produce, description=f"extract {task}")
    finally:
        for r in (base, tau, masks):
            r.close()
    return out
