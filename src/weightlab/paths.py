"""Paths that come from inside files, and file names that must fit the file system.

The containment rule: **no path read from a file leaves its folder.** A shard name in a Hugging Face index,
a path in a store manifest, a side file copied from a model folder: each goes through :func:`contained`,
which refuses absolute paths, ``..`` and symbolic links that resolve outside the folder, before anything is
read or written. :func:`check_file_name` refuses names the file system would reject (too long, with a
separator) with a one-line error instead of an ``OSError`` in the middle of a write.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from weightlab.errors import FormatError, WeightlabError

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


def contained(name: object, folder: str | os.PathLike[str], *, source: str | os.PathLike[str]) -> Path:
    """``folder / name``, if it stays inside ``folder``; else a :class:`FormatError` naming ``source``.

    Args:
        name: a relative path read from the file ``source`` (``"model-00001.safetensors"``, ``"base/x"``).
        folder: the folder the path must stay in (the folder of ``source``, or the store).
        source: the file the name was read from (for the message).

    Raises:
        FormatError: ``name`` is not a non-empty string, is absolute, has a ``..`` part, or resolves
            (following symbolic links) outside ``folder``.
    """
    where = f"{str(source)!r}"
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise FormatError(f"{where} names the path {name!r}; expected a relative path inside {str(folder)!r}")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name.replace("\\", "/")).parts):
        raise FormatError(f"{where} names the path {name!r}, which leaves its folder {str(folder)!r} "
                          "(absolute or with '..'); expected a relative path inside it")
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if root not in target.parents:
        raise FormatError(f"{where} names the path {name!r}, which resolves to {str(target)!r} outside its "
                          f"folder {str(root)!r} (a symbolic link?); expected a path inside it")
    return Path(folder) / name


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved, so links count where they point)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) allows."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or not a folder
        return NAME_MAX


def check_file_name(name: str, folder: str | os.PathLike[str], *, what: str, extra: int = 0) -> str:
    """Refuse ``name`` unless it is one plain file name that fits in ``folder`` with ``extra`` more bytes.

    ``extra`` counts what weightlab adds around the name (a suffix, the affixes of a temporary file).
    """
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise WeightlabError(f"{what} {name!r} is not a plain file name (no '/', not empty)")
    limit = name_max(folder) - extra
    size = len(os.fsencode(name))
    if size > limit:
        raise WeightlabError(f"{what} {name[:40] + '…'!r} is {size} bytes long; at most {limit} fit in a file "
                             f"name in {str(folder)!r}")
    return name
