"""Tensor-at-a-time safetensors I/O for checkpoints larger than memory.

:class:`SafetensorsReader` parses a file's header and reads one tensor at a time, into memory the caller may
reuse (positional reads, no memory map, so the resident memory of a merge does not grow with the files it
has read). :class:`SafetensorsWriter` writes
the header first (shapes and dtypes are known in advance: a merged checkpoint has the layout of its base)
and then each tensor's bytes in order, so a file is written without holding it in memory. Files written
here are ordinary safetensors files (``safetensors.torch.load_file`` reads them).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError
from weightlab.weights.io import atomic_dir, default_mode  # noqa: F401 - re-exported

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
MAX_HEADER = 100_000_000  # bytes, as the safetensors library
HAVE_PREADV = hasattr(os, "preadv")
USIZE = 1 << 64  # offsets, shapes and sizes are u64 in the safetensors library; larger values overflow


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
    """The tensors (in file order), the ``__metadata__`` and the data-section offset of a safetensors file.

    The header is checked as strictly as the safetensors library checks it (:func:`validate_header`), so a
    file this accepts is one ``safetensors.torch.load_file`` reads to the same tensors.

    Raises:
        FormatError: naming the file (and the tensor) for anything but a valid safetensors file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{str(path)!r} is not a readable safetensors file (shorter than the 8-byte header "
                                  "length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{str(path)!r} is not a readable safetensors file (header length {n} but the file "
                                  f"holds {size} bytes; at most {MAX_HEADER})")
            text = f.read(n)
    except OSError as exc:
        raise FormatError(f"{str(path)!r} is not a readable safetensors file ({exc.strerror or exc})") from None
    infos, meta = validate_header(parse_header(text, path), data_size=size - 8 - n, path=path)
    return infos, meta, 8 + n


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {dup!r} appears twice")
    return out


def parse_header(text: bytes, path: Path) -> object:
    """The JSON of a header: UTF-8, strict JSON (no NaN or Infinity, no key given twice)."""
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"{str(path)!r} is not a readable safetensors file (its header is not JSON: {exc})") from None


def validate_header(header: object, *, data_size: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a parsed header against a data section of ``data_size`` bytes; the tensors in file order.

    As the safetensors library: a JSON object; ``__metadata__`` absent, null or a str → str map; every
    tensor ``{dtype, shape, data_offsets}`` with a known dtype, non-negative integer dimensions and offsets;
    sorted by offset, the tensors tile the data section from 0 without gap or overlap, each spanning exactly
    ``numel × dtype size`` bytes (no u64 overflow), and the last one ends at the end of the file.
    """
    where = str(path)
    if not isinstance(header, dict):
        raise FormatError(f"{where!r} is not a readable safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise FormatError(f"{where!r}: __metadata__ must map strings to strings, got {_short(meta)}")
    infos = sorted(((k, _tensor_info(k, v, where)) for k, v in header.items() if k != "__metadata__"),
                   key=lambda item: (item[1].start, item[1].end))
    offset = 0
    for key, info in infos:
        if info.start != offset or info.end < info.start:
            raise FormatError(f"{where!r}: tensor {key!r} has data_offsets [{info.start}, {info.end}]; expected it "
                              f"to start at byte {offset} (tensors must tile the data section from 0, without "
                              "gaps, overlaps or reversed offsets)")
        nbytes = _nbytes(key, info, where)
        if info.end - info.start != nbytes:
            raise FormatError(f"{where!r}: tensor {key!r} ({info.dtype} {list(info.shape)}) needs {nbytes} bytes "
                              f"but its data_offsets span {info.end - info.start}")
        offset = info.end
    if offset != data_size:
        raise FormatError(f"{where!r}: the tensors take {offset} bytes but the file holds {data_size} after its "
                          "header (truncated, or trailing bytes)")
    return dict(infos), dict(meta or {})


def _is_u64(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < USIZE


def _tensor_info(key: str, v: object, where: str) -> TensorInfo:
    if not isinstance(v, dict) or not {"dtype", "shape", "data_offsets"} <= set(v):
        raise FormatError(f"{where!r}: header entry {key!r} is {_short(v)}; expected "
                          "{dtype, shape, data_offsets}")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where!r}: tensor {key!r} has unsupported dtype {_short(dtype)}; expected one of "
                          f"{', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
        raise FormatError(f"{where!r}: tensor {key!r} has shape {_short(shape)}; expected a list of "
                          "non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise FormatError(f"{where!r}: tensor {key!r} has data_offsets {_short(offsets)}; expected [start, end], "
                          "two non-negative integers")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _nbytes(key: str, info: TensorInfo, where: str) -> int:
    n = 1
    for s in info.shape:  # overflow is checked on every partial product, as the library does
        n *= s
        if n >= USIZE:
            break
    bits = n * 8 * torch.empty((), dtype=DTYPES[info.dtype]).element_size()
    if n >= USIZE or bits >= USIZE:
        raise FormatError(f"{where!r}: tensor {key!r} has shape {list(info.shape)}, whose size overflows 64 bits")
    return bits // 8


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class SafetensorsReader:
    """Read single tensors of one safetensors file (keeps one file handle open).

    Reads are positional (``os.preadv``) where the platform has it, so threads may read different tensors of
    one file at once (a merge reads the next key ahead while it computes this one); elsewhere a lock
    serialises them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self._data = read_header(self.path)
        self._size = self._data + max((i.end for i in self.tensors.values()), default=0)
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()

    def read(self, key: str) -> Tensor:
        info = self.tensors[key]
        return self.read_into(key, torch.empty(info.shape, dtype=DTYPES[info.dtype]))

    def read_into(self, key: str, out: Tensor) -> Tensor:
        """Read tensor ``key`` straight into ``out`` (contiguous, its dtype and number of entries; no copy).

        Returns:
            ``out`` viewed with the tensor's shape.
        """
        info = self.tensors[key]
        dtype = DTYPES[info.dtype]
        if out.dtype != dtype or out.numel() != info.numel or not out.is_contiguous():
            raise WeightlabError(f"read_into({key!r}) needs a contiguous {dtype} tensor of {info.numel} entries, "
                                 f"got {out.dtype} {tuple(out.shape)}")
        if info.end > info.start:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            start = self._data + info.start
            if HAVE_PREADV:
                with self._lock:
                    fd = self._open().fileno()
                got = _read_fully(lambda part, done: os.preadv(fd, [part], start + done), view)
            else:
                with self._lock:
                    file = self._open()
                    file.seek(start)
                    got = _read_fully(lambda part, _done: file.readinto(part), view)
            if got != info.end - info.start:
                raise FormatError(f"{str(self.path)!r}: tensor {key!r} is truncated")
        return out.view(info.shape)

    def _open(self) -> BinaryIO:
        if self._file is None:
            file = open(self.path, "rb", buffering=0)  # closed in close()
            if os.fstat(file.fileno()).st_size != self._size:
                file.close()
                raise FormatError(f"{str(self.path)!r} changed size since its header was read")
            self._file = file
        return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _read_fully(read: Callable[[memoryview, int], int | None], view: memoryview) -> int:
    """Call ``read(rest_of_view, bytes_so_far)`` until ``view`` is full or the file ends; the bytes read.

    One system call reads at most about 2 GiB on Linux, so a large tensor takes several.
    """
    done = 0
    while done < len(view):
        got = read(view[done:], done)
        if not got:
            break
        done += got
    return done


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
        if tensor.numel():
            self._file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close the file without checking that every tensor was written (the caller deletes it)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expect):
            raise WeightlabError(f"writer closed after {self._next} of {len(self._expect)} tensors")
