"""Small shared helpers: seeding and device choice (config parsing lives in ``weightlab.experiments.configs``)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from weightlab.errors import WeightlabError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *keys: object) -> int:
    """A seed derived from ``seed`` and ``keys`` (stable across processes and Python versions).

    Continual runs re-seed every experience with ``derive_seed(seed, method, index)``, which is what makes a
    resumed run end with exactly the numbers of an uninterrupted one.
    """
    text = "/".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def choose_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise WeightlabError(f"device {device!r} is not a valid torch device "
                             "(expected auto, cpu, cuda, cuda:N)") from exc


