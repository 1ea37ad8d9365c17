"""PEFT LoRA adapter folders as fine-tuned checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``).

An adapter changes a few matrices of its base model by ``ΔW = B·A·(α/r)`` (``α/√r`` with ``use_rslora``;
transposed for ``fan_in_fan_out`` layers and for embeddings). :class:`LoraCheckpoint` presents the adapter as
the full fine-tuned model ``θ_0 + ΔW`` with the base's layout, materialising one tensor at a time when a merge
reads it; tensors the adapter saves whole (``modules_to_save``, biases) replace the base's, and every other
tensor is the base's (its task vector is 0). The config and every pair of matrices are checked first (ranks,
shapes, the tensor each one patches), with a one-line error naming the file and the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import FormatError, WeightlabError
from weightlab.weights.stream_io import SafetensorsReader

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PARTS = {"lora_A.weight": ("A", ".weight"), "lora_B.weight": ("B", ".weight"),
         "lora_embedding_A": ("A", ".weight"), "lora_embedding_B": ("B", ".weight")}


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return path.is_dir() and (path / CONFIG).is_file()


def _config(path: Path) -> dict:
    where = str(path / CONFIG)
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise FormatError(f"{where!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise FormatError(f"{where!r}: peft_type {found!r}; weightlab reads LoRA adapters (peft_type LORA)")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise FormatError(f"{where!r}: {flag} adapters are not supported (expected a plain LoRA adapter)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise FormatError(f"{where!r}: r must be an integer ≥ 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise FormatError(f"{where!r}: lora_alpha must be a number, got {alpha!r}")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(pattern) or {}, dict):
            raise FormatError(f"{where!r}: {pattern} must map module names to numbers")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rule: a pattern applies to a module whose name is it or ends with ``.`` + it (regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraCheckpoint:
    """A LoRA adapter read as the fine-tuned model ``θ_0 + B·A·(α/r)``, with the base's layout.

    Args:
        path: the adapter folder.
        base: the base checkpoint (its layout and tensors).
        rename: maps the adapter's module names onto the base's (the prefix options), or None to drop one.
    """

    def __init__(self, path: Path, base: object, rename: Callable[[str], str | None]) -> None:
        self.path, self.base = Path(path), base
        self.is_folder = True
        if not (self.path / WEIGHTS).is_file():
            raise WeightlabError(f"adapter folder {str(self.path)!r} has {CONFIG} but no {WEIGHTS} (expected a "
                                 "PEFT LoRA adapter saved with save_pretrained)")
        self.config = _config(self.path)
        self.reader = SafetensorsReader(self.path / WEIGHTS)
        self.layout = dict(base.layout)  # type: ignore[attr-defined]
        self.pairs: dict[str, dict[str, str]] = {}  # base key -> {"A": key, "B": key}
        self.whole: dict[str, str] = {}  # base key -> adapter key (saved whole)
        self.dropped: list[str] = []
        self.scaling: dict[str, float] = {}
        self._index(rename)

    @property
    def name(self) -> str:
        return self.path.name

    def _target(self, key: str) -> tuple[str, str | None, str]:
        """(module name, part A/B or None, base-space key or '') of an adapter tensor name."""
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, (part, weight) in PARTS.items():
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                return module, part, module + weight
        if re.search(r"\.lora_[A-Za-z_]+", name):
            raise FormatError(f"{str(self.path / WEIGHTS)!r}: tensor {key!r} is not a lora_A/lora_B matrix (DoRA, "
                              "AdaLoRA, a LoRA bias?); weightlab materialises plain LoRA adapters")
        return name, None, name

    def _index(self, rename: Callable[[str], str | None]) -> None:
        where = str(self.path / WEIGHTS)
        for key in self.reader.tensors:
            module, part, target = self._target(key)
            mapped = rename(target)
            if mapped is None:
                self.dropped.append(target)
                continue
            if mapped not in self.layout:
                raise WeightlabError(f"{where!r}: tensor {key!r} patches {mapped!r}, which the base lacks")
            if part is None:
                self._check_shape(key, tuple(self.reader.tensors[key].shape), mapped)
                self.whole[mapped] = key
                continue
            self.pairs.setdefault(mapped, {})[part] = key
            r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
            self.scaling[mapped] = alpha / (r ** 0.5 if self.config.get("use_rslora") else r)
        for mapped, pair in self.pairs.items():
            if set(pair) != {"A", "B"}:
                raise FormatError(f"{where!r}: {mapped!r} has lora_{''.join(pair)} but no "
                                  f"lora_{'B' if 'A' in pair else 'A'}")
            self._check_pair(mapped, pair)

    def _check_pair(self, mapped: str, pair: dict[str, str]) -> None:
        where = str(self.path / WEIGHTS)
        a, b = (tuple(self.reader.tensors[pair[p]].shape) for p in ("A", "B"))
        module = self._target(pair["A"])[0]
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        if len(a) != 2 or len(b) != 2:
            raise FormatError(f"{where!r}: {pair['A']!r} is {list(a)} and {pair['B']!r} is {list(b)}; expected "
                              "two matrices (convolution LoRA is not supported)")
        if a[0] != r or b[1] != r:
            raise FormatError(f"{where!r}: {mapped!r} has lora_A {list(a)} and lora_B {list(b)}; rank r = {r} in "
                              f"{CONFIG} expects lora_A [{r}, in] and lora_B [out, {r}]")
        self._check_shape(pair["A"], self._delta_shape(pair, b[0], a[1]), mapped)

    def _transposed(self, pair: dict[str, str]) -> bool:
        return "lora_embedding" in pair["A"] or bool(self.config.get("fan_in_fan_out"))

    def _delta_shape(self, pair: dict[str, str], rows: int, cols: int) -> tuple[int, ...]:
        return (cols, rows) if self._transposed(pair) else (rows, cols)

    def _check_shape(self, key: str, shape: tuple[int, ...], mapped: str) -> None:
        dtype, base_shape = self.layout[mapped]
        if tuple(shape) != tuple(base_shape) or not dtype.is_floating_point:
            raise FormatError(f"{str(self.path / WEIGHTS)!r}: {key!r} gives {mapped!r} the shape {list(shape)}, the "
                              f"base has {str(dtype).replace('torch.', '')} {list(base_shape)}")

    def delta(self, key: str) -> Tensor:
        """``B·A·scaling`` of one base key (float32, the base tensor's shape)."""
        pair = self.pairs[key]
        a, b = (self.reader.read(pair[p]).to(torch.float32) for p in ("A", "B"))
        delta = (b @ a) * self.scaling[key]  # (out, in)
        return delta.T.contiguous() if self._transposed(pair) else delta

    def numel(self, key: str) -> int:
        return self.base.numel(key)  # type: ignore[attr-defined]

    def read(self, key: str) -> Tensor:
        """The fine-tuned tensor of ``key``: base + ΔW (float32), the saved tensor, or the base's."""
        if key in self.whole:
            return self.reader.read(self.whole[key])
        theta0 = self.base.read(key)  # type: ignore[attr-defined]
        if key not in self.pairs:
            return theta0
        return theta0.to(torch.float32) + self.delta(key)

    def files(self) -> list[Path]:
        """The files this checkpoint reads (for provenance digests)."""
        return [self.path / CONFIG, self.path / WEIGHTS]

    def close(self) -> None:
        self.reader.close()
