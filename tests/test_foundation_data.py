"""Embedded digits, its derivations, and the local-folder loaders on tiny files built here."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from weightlab.data import (
    class_incremental,
    cumulative,
    digits,
    domain_incremental,
    load_cifar,
    load_cifar10c,
    load_image_folder,
    load_mnist,
    permute_pixels,
    task_incremental,
)
from weightlab.errors import FormatError, WeightlabError

# ------------------------------------------------------------------------------------------ digits


def test_digits_split_sizes_and_range(digits8):
    train, test = digits8
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 10
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert set(train.classes) == set(range(10)) == set(test.classes)


def test_train_and_test_are_disjoint(digits8):
    train, test = digits8
    a = {tuple(r) for r in train.x.flatten(1).mul(16).round().int().tolist()}
    b = [tuple(r) for r in test.x.flatten(1).mul(16).round().int().tolist()]
    # sklearn digits holds a few exact duplicates; almost every test image must be unseen
    assert sum(r in a for r in b) < 0.02 * len(b)


@pytest.mark.parametrize("size", [16, 28])
def test_upsampled_digits(size):
    d = digits("test", size=size)
    assert d.x.shape[1:] == (1, size, size)
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0


def test_augmented_digits_are_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))
    a = digits("train", size=16, augment_to=3000, seed=1)
    assert len(a) == 3000 and len(list(tmp_path.glob("*.safetensors"))) == 1
    b = digits("train", size=16, augment_to=3000, seed=1)  # from the cache
    c = digits("train", size=16, augment_to=3000, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    n = len(digits("train", size=16))
    assert torch.equal(a.x[:n], digits("train", size=16).x)  # originals first
    assert not torch.equal(a.x[n:2 * n], a.x[:n])  # then augmented copies


def test_bad_digits_arguments():
    with pytest.raises(WeightlabError, match="size"):
        digits(size=12)
    with pytest.raises(WeightlabError, match="split"):
        digits("validation")
    with pytest.raises(WeightlabError, match="augment_to"):
        digits("train", augment_to=10)


# ------------------------------------------------------------------------------------------ scenarios


def test_class_incremental_is_seeded_partition(digits8):
    s1 = class_incremental(*digits8, 5, seed=3)
    s2 = class_incremental(*digits8, 5, seed=3)
    s3 = class_incremental(*digits8, 5, seed=4)
    assert [e.classes for e in s1] == [e.classes for e in s2] != [e.classes for e in s3]
    assert sorted(c for e in s1 for c in e.classes) == list(range(10))
    for e in s1:
        assert set(e.train.classes) == set(e.classes) == set(e.test.classes) == set(e.val.classes)
    assert len(cumulative(s1, 4)) == sum(len(e.train) for e in s1)
    # validation is carved from training data
    assert sum(len(e.train) + len(e.val) for e in s1) == len(digits8[0])


def test_task_incremental_local_labels_and_ids(digits8):
    stream = task_incremental(*digits8, 5, seed=0)
    for e in stream:
        assert set(e.train.y.tolist()) == {0, 1}
        assert e.train.t is not None and set(e.train.t.tolist()) == {e.task_id}


def test_domain_incremental_permutation_and_rotation(digits8):
    perm = domain_incremental(*digits8, 3, kind="permutation", seed=0)
    assert torch.equal(perm[0].test.x, digits8[1].x)  # first task untouched
    assert not torch.equal(perm[1].test.x, perm[2].test.x)
    # a permutation only moves pixels
    assert torch.allclose(perm[1].test.x.sum((1, 2, 3)), digits8[1].x.sum((1, 2, 3)))
    rot = domain_incremental(*digits8, 2, kind="rotation", max_degrees=360)  # task 1: 180°
    assert torch.allclose(rot[1].test.x, digits8[1].x.flip(-1).flip(-2), atol=1e-5)
    with pytest.raises(WeightlabError, match="kind"):
        domain_incremental(*digits8, 2, kind="blur")


def test_permute_pixels_known_answer():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert permute_pixels(x, torch.tensor([3, 2, 1, 0])).flatten().tolist() == [3, 2, 1, 0]


def test_uneven_split_is_rejected(digits8):
    with pytest.raises(WeightlabError, match="evenly"):
        class_incremental(*digits8, 3)


# ------------------------------------------------------------------------------------------ local files


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    for name, arr in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)]:
        data = _idx(arr)
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    d = load_mnist(tmp_path, "train")
    assert d.x.shape == (5, 1, 28, 28)
    assert torch.allclose(d.x[2, 0], torch.from_numpy(images[2]).float() / 255)
    assert d.y.tolist() == [0, 1, 2, 3, 9]


def test_mnist_missing_and_malformed(tmp_path):
    with pytest.raises(FormatError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2, np.uint8)))
    with pytest.raises(FormatError, match=r"t10k-images-idx3-ubyte.*idx"):
        load_mnist(tmp_path, "test")


def test_cifar10_and_cifar100_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    train, test = load_cifar(tmp_path, "train"), load_cifar(tmp_path, "test")
    assert train.x.shape == (20, 3, 32, 32) and test.y.tolist() == [0, 1, 2, 9]
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    assert torch.allclose(test.x[0], torch.from_numpy(raw.reshape(3, 32, 32)).float() / 255)

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    (c100 / "test").write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                              b"fine_labels": [5, 50, 99], b"coarse_labels": [0, 1, 2]}))
    assert load_cifar(tmp_path, "test", classes=100).y.tolist() == [5, 50, 99]


def test_cifar_refuses_code_and_names_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(FormatError, match=r"test_batch.*CIFAR python batch"):
        load_cifar(tmp_path, "test")
    with pytest.raises(FormatError, match="data_batch_1"):
        load_cifar(tmp_path, "train")


def test_image_folder(tmp_path):
    for c, color in [("cat", 0), ("dog", 255)]:
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), (color, color, color)).save(tmp_path / c / f"{i}.png")
    d = load_image_folder(tmp_path, size=8)
    assert d.x.shape == (4, 3, 8, 8) and d.y.tolist() == [0, 0, 1, 1]
    assert d.x[0].max() == 0 and d.x[3].min() == 1
    (tmp_path / "dog" / "broken.png").write_bytes(b"nope")
    with pytest.raises(FormatError, match="broken.png"):
        load_image_folder(tmp_path)


def test_cifar10c_npy(tmp_path):
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    images[4:6] = 255  # severity 3 of 5 (2 images per severity)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(10))
    d = load_cifar10c(tmp_path, "fog", 3)
    assert d.x.shape == (2, 3, 32, 32) and d.x.min() == 1 and d.y.tolist() == [4, 5]
    with pytest.raises(FormatError, match=r"snow\.npy"):
        load_cifar10c(tmp_path, "snow", 1)
    with pytest.raises(WeightlabError, match="severity"):
        load_cifar10c(tmp_path, "fog", 6)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(FormatError, match=r"bad\.npy"):
        load_cifar10c(tmp_path, "bad", 1)


def test_augment_to_the_training_size_is_the_originals():
    n = len(digits("train"))
    assert torch.equal(digits("train", augment_to=n).x, digits("train").x)


def test_atomic_writes_have_normal_permissions(tmp_path):
    import os

    from weightlab.weights.io import save_tensors

    save_tensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left
