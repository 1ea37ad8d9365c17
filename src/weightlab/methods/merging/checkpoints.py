"""Checkpoints on disk: one ``.safetensors`` file or a Hugging Face model folder (``model.safetensors`` or
shards listed in ``model.safetensors.index.json``), read one tensor at a time; and writing a checkpoint with
the layout (files, key order, dtypes, metadata, side files such as ``config.json``) of another.

Every file name read from inside a folder (the index's shard names) and every side file must stay inside
the folder (:func:`weightlab.paths.contained`); this is checked when the checkpoint is opened, before
anything is written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError, warn
from weightlab.methods.merging.lora import LoraCheckpoint, is_adapter
from weightlab.methods.merging.prefixes import Renamed, prefix_hint, renamer
from weightlab.methods.merging.task_arithmetic import describe_mismatches
from weightlab.paths import contained, inside
from weightlab.report.progress import track
from weightlab.weights.io import PICKLE_SUFFIXES, atomic_dir, atomic_path, check_not_pickle, default_mode
from weightlab.weights.stream_io import DTYPES, SafetensorsReader, SafetensorsWriter

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


@dataclass(frozen=True)
class Source:
    """A fine-tuned input: a checkpoint (file, HF folder or LoRA adapter folder) and how its names map.

    Attributes:
        path: the checkpoint.
        strip_prefix: remove this prefix from its tensor names (tensors without it are left out).
        add_prefix: put this prefix in front of its tensor names (the base's tensors without it stay).
    """

    path: Path
    strip_prefix: str = ""
    add_prefix: str = ""


def as_source(item: str | Path | Source) -> Source:
    return item if isinstance(item, Source) else Source(Path(item))


def source_path(item: str | Path | Source) -> Path:
    return as_source(item).path


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
        self.side_files = self._side_files() if self.is_folder else []
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
        index = self.path / INDEX
        if index.is_file():
            try:
                self.index = json.loads(index.read_text(encoding="utf-8"))
                weight_map = self.index["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"{str(index)!r} is not a safetensors index ({exc!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise FormatError(f"{str(index)!r}: weight_map must map tensor names to shard file names")
            names = list(dict.fromkeys(weight_map[k] for k in sorted(weight_map)))
            for name in names:
                contained(name, self.path, source=index)
            return names
        if (self.path / SINGLE).is_file():
            return [SINGLE]
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            check_not_pickle(self.path / pickles[0])
        raise WeightlabError(
            f"folder {str(self.path)!r} holds neither {SINGLE} nor {INDEX} "
            "(expected a Hugging Face model folder with safetensors weights)"
        )

    def _side_files(self) -> list[str]:
        """The folder's other files (``config.json``, the index, tokenizer files), each inside the folder."""
        names = []
        for item in sorted(self.path.iterdir()):
            if item.suffix == ".safetensors" or item.suffix.lower() in PICKLE_SUFFIXES or not item.is_file():
                continue
            contained(item.name, self.path, source=item)
            names.append(item.name)
        return names

    def copy_to(self, dest: Path) -> None:
        """Copy the checkpoint's own files (shards, side files) to ``dest`` (a file or a new folder)."""
        if not self.is_folder:
            shutil.copy2(self.path, dest)
            return
        dest.mkdir()
        for name in [*self.side_files, *self.readers]:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path / name, dest / name)

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

    def files(self) -> list[Path]:
        """The files this checkpoint reads (for provenance digests)."""
        root = self.path if self.is_folder else self.path.parent
        return ([self.path / INDEX] if self.index is not None else []) + [root / n for n in self.readers]

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def open_source(item: str | Path | Source, base: Checkpoint) -> Checkpoint | LoraCheckpoint | Renamed:
    """Open one fine-tuned input against ``base``: a checkpoint, a LoRA adapter, renamed if asked."""
    source = as_source(item)
    if is_adapter(source.path):
        return LoraCheckpoint(source.path, base, renamer(source.strip_prefix, source.add_prefix))
    ckpt = Checkpoint(source.path)
    if source.strip_prefix or source.add_prefix:
        try:
            return Renamed(ckpt, base, strip_prefix=source.strip_prefix, add_prefix=source.add_prefix)
        except BaseException:
            ckpt.close()
            raise
    return ckpt


def open_all(
    base: str | Path, finetuned: Sequence[str | Path | Source], *, minimum: int = 2, base_is_input: bool = False
) -> tuple[Checkpoint, list]:
    """Open the base and fine-tuned checkpoints and check them (same keys, shapes, dtypes; ≥ ``minimum``).

    A fine-tuned input may be a :class:`Source` (prefix options) or a LoRA adapter folder. A mismatch in the
    names that a prefix explains says which option fixes it. ``base_is_input``: the base may also be one of
    the models (``linear``, ``slerp``), so that is not warned about.
    """
    if len(finetuned) < minimum:
        raise WeightlabError(
            f"expected at least {minimum} fine-tuned checkpoint{'s' * (minimum != 1)} besides the base, got "
            f"{len(finetuned)}"
        )
    warn_duplicates(base, [source_path(f) for f in finetuned], base_is_input=base_is_input)
    base_ckpt = Checkpoint(base)
    fts: list = []
    try:
        layout = base_ckpt.layout
        for item in finetuned:
            fts.append(open_source(item, base_ckpt))
            ft = fts[-1]
            problem = describe_mismatches(layout, ft.layout, f"checkpoint {str(ft.path)!r}")
            if problem:
                hint = prefix_hint(layout, ft.layout)
                raise WeightlabError(problem + (f"; {hint}" if hint else ""))
    except BaseException:
        for c in [base_ckpt, *fts]:
            c.close()
        raise
    return base_ckpt, fts


def warn_duplicates(base: str | Path, finetuned: list[Path], *, base_is_input: bool = False) -> None:
    """Warn when a fine-tuned checkpoint is the base itself or is given more than once (same file)."""
    seen: dict[Path, int] = {}
    for t, p in enumerate(finetuned):
        real = Path(p).resolve()
        if real == Path(base).resolve():
            if base_is_input:
                continue
            warn(f"fine-tuned checkpoint {str(p)!r} is the base itself (its task vector is zero)")
        elif real in seen:
            warn(f"checkpoint {str(p)!r} is given twice (tasks {seen[real] + 1} and {t + 1}); each copy counts "
                 "as a task")
        seen.setdefault(real, t)


def check_output(out: str | Path, inputs: Sequence[str | Path | Source] = ()) -> Path:
    """``out`` as a path, refused if it exists or lies inside one of the ``inputs`` folders."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise WeightlabError(f"output {str(out)!r} already exists; choose another --out or delete it first")
    for p in map(source_path, inputs):
        if Path(p).is_dir() and inside(out, p):
            raise WeightlabError(f"output {str(out)!r} is inside the input folder {str(p)!r}; choose an --out "
                                 "outside it")
    return out


def write_like(
    base: Checkpoint,
    out: Path,
    produce: Callable[[str], Tensor],
    *,
    description: str,
    dtype: torch.dtype | None = None,
    provenance: Mapping[str, str] | None = None,
) -> None:
    """Write a checkpoint with ``base``'s layout whose tensor ``key`` is ``produce(key)``, atomically.

    A file base gives a file; a folder base gives a folder with the same shards, index and side files.
    ``dtype`` changes the floating-point tensors' dtype (and ``torch_dtype`` in ``config.json``).
    ``provenance`` maps file names (``merge_config.yaml``, ``README.md``) to their text: a folder gets the
    files, a single file gets each text in its safetensors metadata under the file's stem (``merge_config``).
    """
    extra = dict(provenance or {})
    if not base.is_folder:
        meta = {Path(name).stem: text for name, text in extra.items() if name.endswith(".yaml")}
        with atomic_path(out, exclusive=True) as tmp:
            _write_shard(base, base.path.name, tmp, produce, description, dtype, meta)
            default_mode(tmp)
        return
    with atomic_dir(out) as tmp:
        for name in base.side_files:
            shutil.copy2(base.path / name, tmp / name)
        if dtype is not None and "config.json" in base.side_files:
            _set_torch_dtype(tmp / "config.json", dtype)
        for name in base.readers:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _write_shard(base, name, tmp / name, produce, description, dtype, {})
        for name, text in extra.items():
            (tmp / name).write_text(text, encoding="utf-8")


def _set_torch_dtype(path: Path, dtype: torch.dtype) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # not JSON: copied as it is
    if isinstance(config, dict) and "torch_dtype" in config:
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_shard(
    base: Checkpoint,
    name: str,
    path: Path,
    produce: Callable[[str], Tensor],
    description: str,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str],
) -> None:
    reader = base.readers[name]
    layout = {k: (DTYPES[i.dtype], i.shape) for k, i in reader.tensors.items()}
    if dtype is not None:
        layout = {k: (dtype if d.is_floating_point else d, s) for k, (d, s) in layout.items()}
    writer = SafetensorsWriter(path, layout, {**reader.metadata, **metadata})
    try:
        for key in track(list(layout), f"{description} {name}"):
            writer.write(key, produce(key))
    except BaseException:
        writer.abort()
        raise
    writer.close()
