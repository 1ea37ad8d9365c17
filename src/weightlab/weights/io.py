"""Weight files: safetensors only, written atomically.

A write goes to a temporary file (or folder) in the destination folder and is moved into place with
:func:`os.replace`, so an interrupted run never leaves a truncated checkpoint behind. Outputs that must not
exist yet (``weightlab merge`` / ``compress`` / ``extract``) are claimed with :func:`exclusive_output`: a
second process writing the same path is refused, and temporaries left by a killed one are removed. Pickle
checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError, warn
from weightlab.paths import check_file_name

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # what tempfile.mkstemp/mkdtemp make below
TEMPORARY_EXTRA = len(".") + len(".XXXXXXXX.tmp")  # bytes a temporary name adds to its destination's name
LOCK_SUFFIX = ".lock"
STALE_AFTER_S = 60.0  # a temporary untouched this long, with no process writing its output, is stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, on error delete it.

    ``exclusive=True`` never replaces an existing ``path`` (the move fails with :class:`WeightlabError`).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        default_mode(Path(tmp))  # mkstemp makes 0600 files; give them the usual permissions
        if exclusive:
            _link_exclusive(Path(tmp), dest)
        else:
            os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_exclusive(tmp: Path, dest: Path) -> None:
    try:
        os.link(tmp, dest)  # atomic, and fails if dest exists
    except FileExistsError:
        raise WeightlabError(f"output {str(dest)!r} appeared while it was being written; it was left as it "
                             "is") from None
    except OSError:  # a file system without hard links
        if dest.exists():
            raise WeightlabError(f"output {str(dest)!r} appeared while it was being written") from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, on error delete it.

    The rename never replaces a file or a non-empty folder at ``path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        default_mode(tmp)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if dest.exists():
                raise WeightlabError(f"output {str(dest)!r} appeared while it was being written; it was left as "
                                     "it is") from None
            raise exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_mode(path: Path) -> None:
    """Give ``path`` the permissions of a plain ``open``/``mkdir`` (temporary files are 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def exclusive_output(path: str | os.PathLike[str], *, what: str = "output") -> Iterator[Path]:
    """Hold the right to create ``path`` until the block ends; stale temporaries of it are removed first.

    Refused with one line (:class:`WeightlabError`) when ``path`` exists, when another process holds it
    (a lock ``.NAME.lock`` beside it, released by the kernel even after ``kill -9``), when its name does
    not fit the file system, or when its folder cannot be created or written. Folders created here are
    removed again if the block fails.
    """
    dest = Path(path)
    check_file_name(dest.name, dest.parent, what=f"{what} name", extra=TEMPORARY_EXTRA)
    if dest.exists() or dest.is_symlink():
        raise WeightlabError(f"{what} {str(dest)!r} already exists; choose another --out or delete it first")
    made = _make_parents(dest.parent, what)
    lock = dest.parent / f".{dest.name}{LOCK_SUFFIX}"
    try:
        fd = _open_lock(lock, dest, what)
    except BaseException:
        _remove_empty(made)
        raise
    done = False
    try:
        if dest.exists() or dest.is_symlink():
            raise WeightlabError(f"{what} {str(dest)!r} already exists; choose another --out or delete it first")
        remove_stale_temporaries(dest)
        yield dest
        done = True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        if not done and not dest.exists():
            _remove_empty(made)


def _make_parents(folder: Path, what: str) -> list[Path]:
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
    except OSError as exc:
        _remove_empty(missing)
        raise WeightlabError(f"cannot create the folder of {what} {str(folder)!r}: {exc.strerror} "
                             f"({str(exc.filename)!r}); expected a folder you can write") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _open_lock(lock: Path, dest: Path, what: str) -> int:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WeightlabError(f"cannot write {what} {str(dest)!r}: {exc.strerror} in {str(dest.parent)!r}; "
                             "expected a folder you can write") from None
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks, the exclusive final move still holds
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the lock file was replaced under us
            raise BlockingIOError
    except OSError:
        os.close(fd)
        raise WeightlabError(f"another process is writing {what} {str(dest)!r} (it holds {str(lock)!r}); wait "
                             "for it to finish or choose another --out") from None
    return fd


def remove_stale_temporaries(dest: Path, *, stale_after: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporaries of earlier, interrupted writes to ``dest``; returns what was removed.

    A temporary is recognised by its name (``.NAME.xxxxxxxx.tmp``, as :func:`atomic_path` and
    :func:`atomic_dir` make them) and its age: nothing in it was modified for ``stale_after`` seconds. Call
    it only while holding :func:`exclusive_output`, so that no other weightlab process is writing ``dest``.
    """
    removed = []
    for item in sorted(dest.parent.iterdir()):
        found = TEMPORARY.fullmatch(item.name)
        if not found or found["name"] != dest.name or item.is_symlink():
            continue
        idle = time.time() - _newest_mtime(item)
        if idle < stale_after:
            warn(f"left {str(item)!r} alone: it looks like a temporary of an interrupted write to {dest.name!r} "
                 f"but changed {idle:.0f} s ago (removed once idle for {stale_after:.0f} s)")
            continue
        size = _size(item)
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
        removed.append(item)
        warn(f"removed {str(item)!r} ({size / 1e6:.1f} MB), a temporary left by an interrupted write to "
             f"{dest.name!r} {idle / 60:.0f} min ago")
    return removed


def _newest_mtime(path: Path) -> float:
    if not path.is_dir():
        return path.lstat().st_mtime
    return max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike[str], *,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file atomically (tensors are made contiguous, shared storage split)."""
    flat = {k: v.detach().contiguous().clone() if _shares(v, tensors) else v.detach().contiguous()
            for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def _shares(v: Tensor, tensors: dict[str, Tensor]) -> bool:
    ptr = v.untyped_storage().data_ptr()
    return sum(1 for w in tensors.values() if w.untyped_storage().data_ptr() == ptr) > 1


def load_tensors(path: str | os.PathLike[str], *, device: str = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file; a missing file, a pickle checkpoint or a corrupt file gives a clear error."""
    p = Path(path)
    check_not_pickle(p)
    if not p.is_file():
        raise WeightlabError(f"weights file {str(p)!r} does not exist (expected a .safetensors file)")
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{str(p)!r} is not a readable safetensors file ({exc})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None


def check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightlabError(
            f"{str(path)!r} looks like a pickle checkpoint; weightlab reads only safetensors. Convert it with "
            "`python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"`"
        )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes taken by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
