"""TTA streams (continual, gradual, repeated, CIFAR-10-C files) and the ``cotta`` experiment end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from weightlab.cli import main
from weightlab.data import digits
from weightlab.data.arrays import ArrayDataset
from weightlab.data.corruptions import CORRUPTIONS
from weightlab.errors import WeightlabError
from weightlab.experiments.cotta import CoTTAExperimentConfig, make_adapter, run_stream, source_model
from weightlab.methods.cotta.streams import (
    cifar10c_stream,
    continual_stream,
    corrupted,
    dirichlet_order,
    gradual_severities,
    gradual_stream,
    repeated,
)
from weightlab.runs import RunContext


@pytest.fixture(scope="module")
def clean(digits16) -> ArrayDataset:
    return digits16[1].subset(torch.arange(40))


def test_continual_stream_is_the_15_types_in_order(clean: ArrayDataset) -> None:
    stream = continual_stream(clean, severity=5, seed=0, n=8)
    assert [d.corruption for d in stream] == list(CORRUPTIONS)
    assert all(d.severity == 5 and len(d.data) == 8 and d.round == 0 for d in stream)
    again = continual_stream(clean, severity=5, seed=0, n=8)
    assert all(torch.equal(a.data.x, b.data.x) for a, b in zip(stream, again, strict=True))
    other = continual_stream(clean, severity=5, seed=1, n=8)
    assert not torch.equal(stream[0].data.x, other[0].data.x)


def test_corrupted_keeps_labels_with_images(clean: ArrayDataset) -> None:
    out = corrupted(clean, "contrast", 1, seed=0)
    means = clean.x.mean((2, 3), keepdim=True)
    expected = (clean.x - means) * 0.75 + means
    # every corrupted image is the contrast-reduced version of the clean image with the same label
    for x, y in zip(out.x, out.y, strict=True):
        matches = ((expected - x).abs().flatten(1).max(1).values < 1e-6).nonzero().squeeze(1)
        assert len(matches) >= 1 and int(clean.y[matches[0]]) == int(y)


def test_gradual_protocol_severities(clean: ArrayDataset) -> None:
    assert gradual_severities(0) == (5, 4, 3, 2, 1)
    assert gradual_severities(3) == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    stream = gradual_stream(clean, corruptions=("fog", "contrast"), n=4)
    assert [d.name for d in stream] == ["fog-5", "fog-4", "fog-3", "fog-2", "fog-1"] + [
        f"contrast-{s}" for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)
    ]


def test_repeated_rounds(clean: ArrayDataset) -> None:
    stream = repeated(continual_stream(clean, corruptions=("fog", "snow"), n=4), 3)
    assert [(d.round, d.corruption) for d in stream] == [(r, c) for r in range(3) for c in ("fog", "snow")]
    assert stream[0].data is stream[2].data
    with pytest.raises(WeightlabError, match="rounds must be ≥ 1, got 0"):
        repeated(stream, 0)


def test_dirichlet_order_is_a_permutation_that_bunches_classes() -> None:
    """Small alpha puts most of a class into few slots (batches hold few classes); large alpha is close to
    the i.i.d. order; the same seed gives the same order."""
    labels = torch.arange(10).repeat_interleave(64)  # (640,), 64 images of each of 10 classes
    shares = {}
    for alpha in (0.01, 100.0):
        order = dirichlet_order(labels, alpha, slots=10, seed=3)
        assert torch.equal(torch.sort(order).values, torch.arange(640))
        assert torch.equal(order, dirichlet_order(labels, alpha, slots=10, seed=3))
        batches = labels[order].view(10, 64)
        shares[alpha] = float(np.mean([torch.bincount(b).max() / 64 for b in batches]))
    assert shares[0.01] > 0.7 and shares[100.0] < 0.3, shares
    with pytest.raises(WeightlabError, match="label_shift"):
        dirichlet_order(labels, 0.0, slots=10, seed=0)


def test_label_shift_and_draws_keep_images_with_labels(clean: ArrayDataset) -> None:
    """A label-shifted domain holds the same (image, label) pairs as the i.i.d. one in another order;
    ``draws=2`` corrupts each chosen image twice with different noise."""
    plain = corrupted(clean, "contrast", 5, seed=1)  # deterministic corruption: pairs comparable
    shifted = corrupted(clean, "contrast", 5, seed=1, label_shift=0.1, slot_size=8)
    key = lambda d: sorted(zip(d.y.tolist(), d.x.flatten(1).sum(1).round(decimals=4).tolist()))  # noqa: E731
    assert key(plain) == key(shifted) and not torch.equal(plain.y, shifted.y)
    twice = corrupted(clean, "gaussian_noise", 5, seed=1, n=10, draws=2)
    assert len(twice) == 20 and torch.equal(torch.bincount(twice.y, minlength=10),
                                            2 * torch.bincount(corrupted(clean, "gaussian_noise", 5, seed=1,
                                                                         n=10).y, minlength=10))
    assert len({round(float(v), 4) for v in twice.x.flatten(1).sum(1)}) == 20  # every draw differs
    with pytest.raises(WeightlabError, match="draws"):
        corrupted(clean, "fog", 5, draws=0)


def test_unknown_corruption_in_a_stream(clean: ArrayDataset) -> None:
    with pytest.raises(WeightlabError, match="unknown corruption 'rain'; expected one of: gaussian_noise"):
        continual_stream(clean, corruptions=("fog", "rain"))


def test_cifar10c_stream_from_npy_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name in ("fog", "snow"):
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (5 * 6, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.tile(np.arange(6), 5).astype(np.uint8))
    stream = cifar10c_stream(tmp_path, severity=5, corruptions=("fog", "snow"), n=4)
    assert [d.name for d in stream] == ["fog-5", "snow-5"]
    assert stream[0].data.x.shape == (4, 3, 32, 32) and stream[0].data.y.tolist() == [0, 1, 2, 3]
    images = np.load(tmp_path / "fog.npy")
    assert torch.allclose(stream[0].data.x[0], torch.from_numpy(images[24].transpose(2, 0, 1)).float() / 255)


def test_adaptation_beats_the_source_model_on_a_corrupted_stream(tmp_path) -> None:
    """The direction of the paper's claim at tiny scale: BN-adapt and CoTTA make fewer errors than the source
    model on severity-5 corruptions that shift the input statistics."""
    config = CoTTAExperimentConfig(
        data="digits",
        epochs=4,
        augment_copies=0,
        val_fraction=0.05,
        flip_prob=0.0,
        width=8,
        n_per_domain=64,
        batch_size=32,
        rounds=1,
        corruptions=("fog", "contrast"),
        n_augmentations=4,
    )
    ctx = RunContext(tmp_path).trial(0)
    source, info = source_model(config, ctx)
    assert info["clean_test_error"] < 15
    test_set = continual_stream(
        digits("test", size=16), severity=5, corruptions=config.corruptions, seed=0, n=64
    )
    errors = {}
    for method in ("source", "bn_adapt", "cotta"):
        adapter = make_adapter(method, copy.deepcopy(source), config, 0, 0.9)
        errors[method] = float(np.mean(run_stream(adapter, test_set, config.batch_size)))
    assert errors["bn_adapt"] < errors["source"] and errors["cotta"] < errors["source"], errors
    # the same images ordered by class (Dirichlet, α = 0.1): batch statistics of a few classes hurt BN-adapt
    bn = {}
    for shift in (None, 0.1):
        stream = continual_stream(digits("test", size=16), severity=5, corruptions=("gaussian_noise", "brightness"),
                                  seed=0, n=64, label_shift=shift, slot_size=config.batch_size)
        adapter = make_adapter("bn_adapt", copy.deepcopy(source), config, 0, 0.9)
        bn[shift] = float(np.mean(run_stream(adapter, stream, config.batch_size)))
    assert bn[0.1] > bn[None] + 4, bn


def test_cli_smoke_run_and_bad_input(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["run", "cotta", "--profile", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["claims"]) == 4  # ordering and growth on the i.i.d. and the label-shifted stream
    assert all((out / "plots" / f"error_per_round_{kind}.png").is_file() for kind in ("iid", "label_shift"))
    assert (
        main(
            [
                "run",
                "cotta",
                "--profile",
                "smoke",
                "--out",
                str(tmp_path / "bad"),
                "--set",
                "corruptions=fog,rain",
            ]
        )
        == 2
    )
    assert (
        main(["run", "cotta", "--profile", "smoke", "--out", str(tmp_path / "bad2"), "--set", "severity=7"])
        == 2
    )
