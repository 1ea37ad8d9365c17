"""Weight files: safetensors only, written atomically.

A write goes to a temporary file in the destination folder and is moved into place with :func:`os.replace`,
so an interrupted run never leaves a truncated checkpoint behind. Pickle checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, on error delete it."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
