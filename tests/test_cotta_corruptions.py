"""The 15 corruptions: severity ordering, shapes and ranges, seeding, known answers, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.data.corruptions import (
    CONTRAST,
    CORRUPTIONS,
    GAUSSIAN_NOISE,
    _box_matrix,
    _disk,
    _elastic,
    _jpeg,
    corrupt,
    plasma_fractal,
)
from weightlab.errors import WeightlabError

RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
}


@pytest.fixture(scope="module")
def images(digits16) -> torch.Tensor:
    return digits16[1].x[:48]  # (48, 1, 16, 16)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def test_fifteen_types_in_the_papers_order() -> None:
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert CORRUPTIONS.index("frost") == 8 and CORRUPTIONS.index("elastic_transform") == 12


@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c != "elastic_transform"])
def test_severity_raises_the_distance_from_the_clean_image(name: str, images: torch.Tensor) -> None:
    d = [
        distance(corrupt(images, name, s, generator=torch.Generator().manual_seed(3)), images) for s in (1, 5)
    ]
    assert d[1] > d[0] > 0, d


def test_elastic_severity_raises_the_non_rigid_distortion(images: torch.Tensor) -> None:
    # CIFAR-10-C's elastic severity 1 is a pure affine jitter of 8% of the side, larger than severity 5's, so
    # the plain pixel distance does not rise with severity; the non-rigid displacement does.
    d = [
        distance(_elastic(images, s, torch.Generator().manual_seed(3), affine=False), images)
        for s in range(5)
    ]
    assert d[0] < 1e-6 and d[1] < d[2] < d[3] < d[4]
    assert (
        distance(corrupt(images, "elastic_transform", 1, generator=torch.Generator().manual_seed(3)), images)
        > 0
    )


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 8, 8), (2, 3, 28, 28), (2, 3, 12, 20)])
def test_shape_range_dtype_and_seed(name: str, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a = corrupt(x, name, 5, generator=torch.Generator().manual_seed(1))
    b = corrupt(x, name, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    if name in RANDOM:
        c = corrupt(x, name, 5, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(a, c)
    assert torch.equal(x, torch.rand(shape, generator=torch.Generator().manual_seed(0)))  # input untouched


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(CORRUPTIONS),
    severity=st.integers(1, 5),
    side=st.sampled_from([8, 12, 16]),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_property_output_in_unit_range(name: str, severity: int, side: int, channels: int, seed: int) -> None:
    x = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(seed))
    out = corrupt(x, name, severity, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_contrast_known_answer() -> None:
    x = torch.tensor([[0.0, 1.0], [0.5, 0.5]]).view(1, 1, 2, 2)  # mean 0.5
    out = corrupt(x, "contrast", 2, generator=None)
    c = CONTRAST[1]
    assert torch.allclose(out, (x - 0.5) * c + 0.5)


def test_brightness_known_answer_grey_and_colour() -> None:
    grey = torch.tensor([0.0, 0.5, 0.9]).view(1, 1, 1, 3)
    assert torch.allclose(corrupt(grey, "brightness", 5), torch.tensor([0.3, 0.8, 1.0]).view(1, 1, 1, 3))
    rgb = torch.tensor([0.4, 0.2, 0.0]).view(1, 3, 1, 1)  # V = 0.4 → 0.5: hue and saturation kept
    assert torch.allclose(corrupt(rgb, "brightness", 3), torch.tensor([0.55, 0.275, 0.0]).view(1, 3, 1, 1))


def test_gaussian_noise_has_the_cifar_std() -> None:
    x = torch.full((4, 3, 32, 32), 0.5)
    out = corrupt(x, "gaussian_noise", 5, generator=torch.Generator().manual_seed(0))
    assert abs(float((out - x).std()) - GAUSSIAN_NOISE[4]) < 0.003
    assert abs(float((out - x).mean())) < 0.003


def test_impulse_noise_fraction_and_values() -> None:
    x = torch.full((4, 3, 32, 32), 0.5)
    out = corrupt(x, "impulse_noise", 5, generator=torch.Generator().manual_seed(0))
    hit = out != 0.5
    assert abs(float(hit.float().mean()) - 0.07) < 0.01
    assert set(out[hit].unique().tolist()) == {0.0, 1.0}


def test_disk_kernels_sum_to_one_and_grow() -> None:
    small, large = _disk(0.3, 0.4), _disk(1.5, 0.1)
    assert torch.isclose(small.sum(), torch.tensor(1.0)) and torch.isclose(large.sum(), torch.tensor(1.0))
    assert torch.allclose(large, torch.full((3, 3), 1 / 9), atol=1e-6)  # radius 1.5: the 3×3 square
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    assert torch.allclose(small, torch.outer(g, g) / g.sum() ** 2, atol=1e-6)  # radius 0.3: the alias blur


def test_box_matrix_is_pils_box_filter() -> None:
    down = _box_matrix(4, 2)  # each output pixel averages two inputs
    assert torch.allclose(down, torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    up = _box_matrix(2, 4)  # upsampling repeats pixels
    assert torch.allclose(up, torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))


def test_jpeg_keeps_flat_images_and_loses_detail() -> None:
    flat = torch.full((1, 3, 16, 16), 100 / 255)
    assert torch.allclose(_jpeg(flat, 40), flat, atol=1.5 / 255)
    checker = (torch.arange(16).view(1, -1) + torch.arange(16).view(-1, 1)) % 2
    x = checker.float().view(1, 1, 16, 16)
    assert distance(_jpeg(x, 40), x) > distance(_jpeg(x, 80), x) > 0


def pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` through PIL/libjpeg as ``make_cifar_c.py`` does (uint8 image, save, reload)."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        arr = np.asarray(Image.open(buf), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr).reshape(img.shape).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize(("channels", "max_gap", "max_off"), [(1, 0.002, 0.1), (3, 0.01, 0.35)])
def test_jpeg_is_close_to_pil_but_not_bit_exact(images: torch.Tensor, channels: int, max_gap: float,
                                                max_off: float) -> None:
    """The documented gap to libjpeg (docs/test_time_adaptation.md): the torch JPEG uses a float DCT and
    bilinear chroma upsampling where libjpeg uses integer transforms and its own upsampling, so grey images
    agree to a level on almost every pixel and colour images differ by a few levels on a fifth of the pixels;
    either way the gap is far below what the corruption itself changes."""
    tint = torch.tensor([1.0, 0.6, 0.3])[:channels].view(1, channels, 1, 1)  # a colour image with chroma
    x = (images.repeat(1, channels, 1, 1) * tint * 255).round() / 255  # (48, C, 16, 16) on the uint8 grid
    ours, theirs = _jpeg(x, 40), pil_jpeg(x, 40)
    gap = distance(ours, theirs)
    assert 0 < gap < max_gap and gap < 0.25 * distance(theirs, x)
    assert float(((ours - theirs).abs() > 1.5 / 255).float().mean()) < max_off


def test_plasma_fractal_range_and_seed() -> None:
    a = plasma_fractal(2, 32, 2.0, generator=torch.Generator().manual_seed(0))
    b = plasma_fractal(2, 32, 2.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 32, 32) and torch.equal(a, b)
    assert torch.allclose(a.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(a.flatten(1).max(1).values, torch.ones(2))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        WeightlabError, match="unknown corruption 'gaussian'.*gaussian_noise.*jpeg_compression"
    ):
        corrupt(torch.rand(1, 1, 8, 8), "gaussian", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, True, 2.0])
def test_severity_outside_1_to_5(severity: object) -> None:
    with pytest.raises(WeightlabError, match="severity must be an integer from 1 to 5"):
        corrupt(torch.rand(1, 1, 8, 8), "fog", severity)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [torch.full((1, 1, 8, 8), 1.5), torch.full((1, 1, 8, 8), -0.1), torch.full((1, 1, 8, 8), float("nan"))],
)
def test_images_outside_the_unit_range(bad: torch.Tensor) -> None:
    with pytest.raises(WeightlabError, match=r"images must lie in \[0, 1\]"):
        corrupt(bad, "contrast", 1)


@pytest.mark.parametrize(
    "bad", [torch.rand(1, 2, 8, 8), torch.rand(8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.long)]
)
def test_images_of_the_wrong_shape_or_dtype(bad: torch.Tensor) -> None:
    with pytest.raises(WeightlabError, match="images must be a float tensor"):
        corrupt(bad, "contrast", 1)
