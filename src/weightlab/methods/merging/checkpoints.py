"""Checkpoints on disk: one ``.safetensors`` file or a Hugging Face model folder (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``), read one tensor at a time; and writing a checkpoint with
the layout (files, key order, dtypes, metadata, side files such as ``config.json``) of another.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError
from weightlab.methods.merging.task_arithmetic import describe_mismatches
from weightlab.report.progress import track
from weightlab.weights.io import PICKLE_SUFFIXES, atomic_path, check_not_pickle
from weightlab.weights.stream_io import DTYPES, SafetensorsReader, SafetensorsWriter, atomic_dir, default_mode

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """A safetensors checkpoint (file or HF folder) whose tensors are read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.is_folder = self.path.is_dir()
        self.index: dict | None = None
        if self.is_folder:
            files = self._folder_files()
        elif self.path.is_file() or self.path.suffix.lower() in PICKLE_SUFFIXES:
            check_not_pickle(self.path)
            files = [self.path.name]
        else:
            raise WeightlabError(
                f"checkpoint {str(self.path)!r} does not exist (expected a .safetensors file "
                "or a Hugging Face model folder)"
            )
        root = self.path if self.is_folder else self.path.parent
        self.readers = {name: SafetensorsReader(root / name) for name in files}
        self.key_file: dict[str, str] = {}
        for name, reader in self.readers.items():
            for key in reader.tensors:
                if key in self.key_file:
                    raise FormatError(f"{str(self.path)!r}: tensor {key!r} appears in two shards")
                self.key_file[key] = name
        if self.index is not None:
            listed = set(self.index["weight_map"])
            if listed != set(self.key_file):
                raise FormatError(
                    f"{str(self.path / INDEX)!r} lists {len(listed)} tensors but the shards hold "
                    f"{len(self.key_file)}"
                )

    def _folder_files(self) -> list[str]:
        if (self.path / INDEX).is_file():
            try:
                self.index = json.loads((self.path / INDEX).read_text())
                weight_map = self.index["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"{str(self.path / INDEX)!r} is not a safetensors index ({exc})") from None
            return list(dict.fromkeys(weight_map[k] for k in sorted(weight_map)))
        if (self.path / SINGLE).is_file():
            return [SINGLE]
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            check_not_pickle(self.path / pickles[0])
        raise WeightlabError(
            f"folder {str(self.path)!r} holds neither {SINGLE} nor {INDEX} "
            "(expected a Hugging Face model folder with safetensors weights)"
        )

    @property
    def name(self) -> str:
        return self.path.name if self.is_folder else self.path.stem

    @property
    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every tensor's dtype and shape, shard by shard in file order."""
        return {k: (DTYPES[i.dtype], i.shape) for r in self.readers.values() for k, i in r.tensors.items()}

    def numel(self, key: str) -> int:
        return self.readers[self.key_file[key]].tensors[key].numel

    def read(self, key: str) -> Tensor:
        return self.readers[self.key_file[key]].read(key)

    def float_keys(self) -> list[str]:
        """The floating-point keys (the ones a merge changes), in file order."""
        return [k for k, (dtype, _) in self.layout.items() if dtype.is_floating_point]

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def open_all(
    base: str | Path, finetuned: list[str | Path], *, minimum: int = 2
) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and fine-tuned checkpoints and check them (same keys, shapes, dtypes; ≥ ``minimum``)."""
    if len(finetuned) < minimum:
        raise WeightlabError(
            f"expected at least {minimum} fine-tuned checkpoints besides the base, got {len(finetuned)}"
        )
    base_ckpt = Checkpoint(base)
    fts = [Checkpoint(p) for p in finetuned]
    layout = base_ckpt.layout
    for ft in fts:
        problem = describe_mismatches(layout, ft.layout, f"checkpoint {str(ft.path)!r}")
        if problem:
            raise WeightlabError(problem)
    return base_ckpt, fts


def check_output(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise WeightlabError(f"output {str(out)!r} already exists; choose another --out or delete it first")
    return out


def write_like(base: Checkpoint, out: Path, produce: Callable[[str], Tensor], *, description: str) -> None:
    """Write a checkpoint with ``base``'s layout whose tensor ``key`` is ``produce(key)``, atomically.

    A file base gives a file; a folder base gives a folder with the same shards, index and side files.
    """
    if not base.is_folder:
        with atomic_path(out) as tmp:
            _write_shard(base, base.path.name, tmp, produce, description)
            default_mode(tmp)
        return
    with atomic_dir(out) as tmp:
        for item in sorted(base.path.iterdir()):
            if (
                item.is_file()
                and item.suffix != ".safetensors"
                and item.suffix.lower() not in PICKLE_SUFFIXES
            ):
                shutil.copy2(item, tmp / item.name)
        for name in base.readers:
            _write_shard(base, name, tmp / name, produce, description)


def _write_shard(
    base: Checkpoint, name: str, path: Path, produce: Callable[[str], Tensor], description: str
) -> None:
    reader = base.readers[name]
    layout = {k: (DTYPES[i.dtype], i.shape) for k, i in reader.tensors.items()}
    writer = SafetensorsWriter(path, layout, reader.metadata)
    try:
        for key in track(list(layout), f"{description} {name}"):
            writer.write(key, produce(key))
    except BaseException:
        writer.abort()
        raise
    writer.close()
