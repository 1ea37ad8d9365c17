"""Tensor-at-a-time safetensors I/O for checkpoints larger than memory.

:class:`SafetensorsReader` parses a file's header and reads one tensor with ``readinto`` (no memory map, so
the resident memory of a merge does not grow with the files it has read). :class:`SafetensorsWriter` writes
the header first (shapes and dtypes are known in advance: a merged checkpoint has the layout of its base)
and then each tensor's bytes in order, so a file is written without holding it in memory. Files written
here are ordinary safetensors files (``safetensors.torch.load_file`` reads them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """The tensors (in file order), the ``__metadata__`` and the data-section offset of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{str(path)!r} is not a readable safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    infos = {}
    for key, v in header.items():
        try:
            if v.get("dtype") not in DTYPES:
                raise FormatError(f"{str(path)!r}: tensor {key!r} has unsupported dtype {v.get('dtype')!r}")
            infos[key] = TensorInfo(v["dtype"], tuple(v["shape"]), *v["data_offsets"])
        except (AttributeError, KeyError, TypeError) as exc:
            raise FormatError(f"{str(path)!r}: header entry {key!r} is malformed ({exc!r}); expected "
                              "{dtype, shape, data_offsets}") from None
    order = sorted(infos, key=lambda k: infos[k].start)
    return {k: infos[k] for k in order}, meta, 8 + n


class SafetensorsReader:
    """Read single tensors of one safetensors file (keeps one file handle open)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self._data = read_header(self.path)
        self._file: BinaryIO | None = None

    def read(self, key: str) -> Tensor:
        info = self.tensors[key]
        if self._file is None:
            self._file = open(self.path, "rb")  # closed in close()
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        if info.end > info.start:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            self._file.seek(self._data + info.start)
            if self._file.readinto(view) != info.end - info.start:
                raise FormatError(f"{str(self.path)!r}: tensor {key!r} is truncated")
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of ``layout`` (a dict of dtype and shape)."""

    def __init__(
        self,
        path: Path,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._expect: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for key, (dtype, shape) in layout.items():
            size = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                size *= s
            header[key] = {
                "dtype": NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
            self._expect.append((key, dtype, tuple(shape)))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * ((-len(text)) % 8)  # align the data section to 8 bytes
        self._file = open(path, "wb")  # closed in close()
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, key: str, tensor: Tensor) -> None:
        name, dtype, shape = self._expect[self._next]
        if key != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise WeightlabError(
                f"writer expected {name!r} {dtype} {shape}, got {key!r} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def abort(self) -> None:
        """Close the file without checking that every tensor was written (the caller deletes it)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expect):
            raise WeightlabError(f"writer closed after {self._next} of {len(self._expect)} tensors")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, on error delete it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        default_mode(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_mode(path: Path) -> None:
    """Give ``path`` the permissions of a plain ``open``/``mkdir`` (temporary files are 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
