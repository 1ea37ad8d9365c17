"""Headers that lie: the streaming reader is as strict as the safetensors library (``tall-masks``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file

from hardening_fixtures import fails, write_files
from weightlab.errors import FormatError
from weightlab.weights.stream_io import DTYPES, SafetensorsReader


def raw_file(path: Path, header: object, data: bytes = b"", *, text: bytes | None = None) -> Path:
    body = text if text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def f32(offsets: list, shape: list | None = None) -> dict:
    return {"dtype": "F32", "shape": [1] if shape is None else shape, "data_offsets": offsets}


LIES = [
    ({"w": f32([-4, 0])}, b"\0" * 4, "tensor 'w' has data_offsets [-4, 0]"),
    ({"w": f32([4, 0])}, b"\0" * 4, "tensor 'w' has data_offsets [4, 0]"),
    ({"a": f32([0, 8], [2]), "b": f32([4, 12], [2])}, b"\0" * 12, "tensor 'b' has data_offsets [4, 12]"),
    ({"a": f32([0, 4]), "b": f32([8, 12])}, b"\0" * 12, "tensor 'b' has data_offsets [8, 12]; expected it to start at "
                                                       "byte 4"),
    ({"w": f32([0, 4000], [1000])}, b"\0" * 16, "the tensors take 4000 bytes but the file holds 16"),
    ({"w": f32([0, 8], [3])}, b"\0" * 8, "tensor 'w' (F32 [3]) needs 12 bytes but its data_offsets span 8"),
    ({"w": f32([0, 4], [-1])}, b"\0" * 4, "tensor 'w' has shape [-1]"),
    ({"w": f32([0, 0], [2**40, 2**40, 0])}, b"", "overflows 64 bits"),
    ({"w": f32([0, 4])}, b"\0" * 12, "file holds 12 after its header"),
    ({"__metadata__": {"a": 1}, "w": f32([0, 4])}, b"\0" * 4, "__metadata__ must map strings to strings"),
    ({"__metadata__": ["a"]}, b"", "__metadata__ must map strings to strings"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "header entry 'w'"),
    ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype 'Q4'"),
    ({"w": f32([0, 4], [1.0])}, b"\0" * 4, "tensor 'w' has shape [1.0]"),
]


@pytest.mark.parametrize(("header", "data", "match"), LIES)
def test_lying_header_is_a_format_error_naming_file_and_tensor(tmp_path: Path, header, data, match) -> None:
    path = raw_file(tmp_path / "lies.safetensors", header, data)
    with pytest.raises(FormatError, match="lies.safetensors") as info:
        SafetensorsReader(path)
    assert match in str(info.value)
    with pytest.raises(SafetensorError):  # the library refuses every one of them too
        load_file(str(path))


def test_header_longer_than_the_file_and_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="header length 1000 but the file holds 10 bytes"):
        SafetensorsReader(path)
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'
    with pytest.raises(FormatError, match="key 'w' appears twice"):
        SafetensorsReader(raw_file(tmp_path / "dup.safetensors", None, b"\0" * 4, text=text))


@pytest.mark.parametrize(("header", "data", "match"), LIES[:5])
def test_merge_with_a_lying_checkpoint_exits_2(tmp_path: Path, capsys, header, data, match) -> None:
    base, fts = write_files(tmp_path)
    raw_file(fts[1], header, data)
    fails(["merge", str(base), *map(str, fts), "--out", str(tmp_path / "o.safetensors")], capsys, match)
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------------- the property test

DTYPE_NAMES = [*DTYPES, "X7"]
small = st.integers(min_value=-2, max_value=40)
anything = st.one_of(st.none(), st.booleans(), small, st.floats(allow_nan=False), st.text(max_size=3),
                     st.lists(small, max_size=3))


@st.composite
def tensor_entries(draw: st.DrawFn) -> dict:
    """Mostly plausible entries (consistent offsets, the right sizes), each possibly broken in one place."""
    entries, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = torch.empty((), dtype=DTYPES.get(dtype, torch.uint8)).element_size()
        for s in shape:
            size *= s
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        if draw(st.integers(0, 3)) == 0:  # break one field
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(anything)
        if draw(st.integers(0, 5)) == 0:
            entry["data_offsets"] = [draw(small), draw(small)]
        entries[f"t{i}"] = entry
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.none(), anything, st.dictionaries(
            st.text(max_size=2), st.one_of(st.text(max_size=2), small), max_size=2)))
    return entries


def read_everything(path: Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(path)
    try:
        return {k: reader.read(k) for k in reader.tensors}
    finally:
        reader.close()


def library(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except (SafetensorError, Exception):
        return None


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=tensor_entries(), data=st.binary(max_size=64), slack=st.sampled_from([0, 0, 0, -1, 1, 4]))
def test_reader_accepts_exactly_what_the_library_accepts(tmp_path: Path, header: dict, data: bytes, slack: int) -> None:
    """Never data from an invalid file, never an exception but FormatError; a valid file reads as the library
    reads it (and every file the library reads, with dtypes weightlab knows, is read)."""
    needed = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"
                  and isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                  and isinstance(e["data_offsets"][1], int)), default=0)
    size = max(needed + slack, 0)  # the size the offsets ask for, or a byte less or more
    body = (data * (size // max(len(data), 1) + 1))[:size] if data else bytes(size)
    path = raw_file(tmp_path / "fuzz.safetensors", header, body)
    expected = library(path)
    try:
        got = read_everything(path)
    except FormatError:
        got = None
    dtypes_known = all(isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES for k, e in header.items()
                       if k != "__metadata__" and isinstance(e, dict))
    event("read" if got is not None else "refused")
    if got is not None:
        assert expected is not None, "accepted a file the library refuses"
        assert set(got) == set(expected)
        assert all(as_bytes(got[k]) == as_bytes(expected[k]) and got[k].shape == expected[k].shape for k in got)
    elif expected is not None:
        assert not dtypes_known, "refused a file the library reads"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200), length=st.one_of(st.none(), st.integers(0, 300)))
def test_random_bytes_are_format_errors(tmp_path: Path, blob: bytes, length: int | None) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes((struct.pack("<Q", length) if length is not None else b"") + blob)
    try:
        got = read_everything(path)
    except FormatError:
        return
    assert library(path) is not None and set(got) == set(library(path)), "returned data for an invalid file"
