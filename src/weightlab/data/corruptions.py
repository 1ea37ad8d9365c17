"""The 15 common corruptions of CIFAR-10-C as batched torch operations (paper key ``cotta``; Hendrycks &
Dietterich's ``make_cifar_c.py`` constants).

``corrupt(x, name, severity, generator=g)`` takes float images ``(N, C, H, W)`` in [0, 1] with ``C`` in
{1, 3} and returns corrupted images of the same shape, dtype and device, in [0, 1]. Randomness comes only from
``generator`` (drawn on the generator's device, then moved), so a seeded generator gives the same images.

How the CIFAR-10-C recipe is adapted:

* Constants are the CIFAR-10-C ones (not ImageNet-C's). Constants given in pixels (blur radii, motion-blur
  length, zoom factors, the 32×32 plasma map of fog) are kept in pixels, i.e. every small image is treated as
  a CIFAR-sized image; constants the original ties to the side (pixelate, elastic) use the actual side.
* One channel: brightness adds ``c`` to the value (HSV V of a grey image is the image), snow's grey term uses
  the image itself, JPEG encodes the luminance plane only (as a greyscale JPEG does), frost uses the
  luminance of its bluish texture.
* Frost: the original blends crops of six photographs of frost; here the texture is synthesised
  procedurally (a plasma fractal plus motion-blurred sparse crystals, tinted bluish-white).
* Glass blur: the reference's per-pixel "swap" acts on NumPy views and is therefore a copy from the up/left
  neighbour; that copy is done here as one gather (the same result, batched).
* Motion blur follows ImageMagick's one-sided Gaussian kernel along a random angle (width 2·radius+1, edge
  pixels replicated); JPEG is a baseline JPEG (libjpeg quality tables, 4:2:0 chroma) in torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.errors import WeightlabError

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)

# CIFAR-10-C constants, one entry per severity 1..5
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500, 250, 100, 75, 50)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # (radius, alias blur)
GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # (sigma, max delta, iterations)
MOTION = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # (radius, sigma)
ZOOM_STOP = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors np.arange(1, stop, 0.01)
SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (image weight, frost weight)
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # (strength, wibble decay)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# (displacement alpha, displacement sigma, affine jitter), each × the image side
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
JPEG_QUALITY = (80, 65, 58, 50, 40)

RGB_TO_GREY = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------------------------ helpers


def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator | None, like: Tensor) -> Tensor:
    dev = g.device if g is not None else like.device
    return (lo + (hi - lo) * torch.rand(shape, generator=g, device=dev)).to(like.device)


def _normal(shape: tuple[int, ...], g: torch.Generator | None, like: Tensor) -> Tensor:
    dev = g.device if g is not None else like.device
    return torch.randn(shape, generator=g, device=dev).to(like.device)


def _grey(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` → ``(N, 1, H, W)`` luminance (the image itself when C = 1)."""
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(RGB_TO_GREY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _filter2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel of ``x`` ``(N, C, H, W)`` with ``kernel`` ``(kh, kw)`` (odd sides)."""
    c = x.shape[1]
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    return F.conv2d(padded, kernel.to(x).expand(c, 1, *kernel.shape), groups=c)


def _gaussian_blur(x: Tensor, sigma: float, *, truncate: float, mode: str) -> Tensor:
    """Separable Gaussian blur as ``skimage.filters.gaussian`` (radius ``int(truncate·sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return x
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    return _filter2d(_filter2d(x, k.view(1, -1), mode), k.view(-1, 1), mode)


def _disk(radius: float, alias_blur: float) -> Tensor:
    """The defocus kernel: an aliased disk on a 17×17 grid, smoothed by a 3×3 Gaussian (cv2 semantics)."""
    grid = torch.arange(-8, 9, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).float()
    disk = disk / disk.sum()
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * alias_blur**2))
    g = g / g.sum()
    smooth = _filter2d(disk[None, None], torch.outer(g, g), "reflect")[0, 0]  # (17, 17)
    nz = smooth.abs().sum(0) > 1e-12  # trim the empty border (same result, smaller kernel)
    idx = nz.nonzero().squeeze(1)
    lo, hi = int(idx.min()), int(idx.max())
    lo, hi = min(lo, 16 - hi), max(hi, 16 - lo)
    return smooth[lo: hi + 1, lo: hi + 1]


def _shift(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``out[n, :, h, w] = x[n, :, h + dy[n], w + dx[n]]`` with edge pixels replicated."""
    n, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None]).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)


def _motion_blur(x: Tensor, radius: float, sigma: float, angle_deg: Tensor) -> Tensor:
    """ImageMagick-style motion blur: one-sided Gaussian weights along ``angle_deg`` ``(N,)``."""
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float32)
    weights = torch.exp(-(i**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    rad = torch.deg2rad(angle_deg)
    out = torch.zeros_like(x)
    for k in range(width):
        if weights[k] < 1e-6:
            break
        dx = torch.round(k * torch.cos(rad)).long()
        dy = torch.round(k * torch.sin(rad)).long()
        out = out + weights[k] * _shift(x, dy, dx)
    return out


def _clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the centre of ``x`` by ``factor`` (bilinear, corners aligned as scipy's ``zoom``)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top: top + ch, left: left + cw]
    size_h, size_w = round(ch * factor), round(cw * factor)
    zoomed = F.interpolate(crop, size=(size_h, size_w), mode="bilinear", align_corners=True)
    trim_h, trim_w = (size_h - h) // 2, (size_w - w) // 2
    return zoomed[..., trim_h: trim_h + h, trim_w: trim_w + w]


def plasma_fractal(n: int, mapsize: int, decay: float, *, generator: torch.Generator | None = None,
                   like: Tensor | None = None) -> Tensor:
    """``(n, mapsize, mapsize)`` diamond-square height maps in [0, 1]; ``mapsize`` is a power of 2."""
    like = torch.empty(0) if like is None else like
    maps = torch.zeros(n, mapsize, mapsize, device=like.device)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        return total / 4 + wibble * _uniform(tuple(total.shape), -wibble, wibble, generator, like)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        maps[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = maps[:, half::step, half::step], maps[:, 0::step, 0::step]
        edges_a = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        edges_b = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, 0::step, half::step] = wibbled_mean(edges_a)
        maps[:, half::step, 0::step] = wibbled_mean(edges_b)
        step, wibble = half, wibble / decay
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / flat.max(1, keepdim=True).values.clamp_min(1e-12)
    return flat.view(n, mapsize, mapsize)


def _mapsize(h: int, w: int) -> int:
    return max(32, 1 << math.ceil(math.log2(max(h, w))))


def _box_matrix(size_in: int, size_out: int) -> Tensor:
    """``(size_out, size_in)`` weights of PIL's BOX resampling along one axis."""
    scale = size_in / size_out
    support = 0.5 * max(scale, 1.0)
    mat = torch.zeros(size_out, size_in)
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size_in)
        for j in range(lo, hi):
            t = (j - centre + 0.5) / max(scale, 1.0)
            mat[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        mat[i] /= mat[i].sum().clamp_min(1e-12)
    return mat


def _frost_texture(n: int, channels: int, h: int, w: int, g: torch.Generator | None, like: Tensor) -> Tensor:
    """Procedural frost ``(n, channels, h, w)`` in [0, 1]: fractal haze plus needle-like crystals."""
    m = _mapsize(h, w)
    haze = plasma_fractal(n, m, 1.6, generator=g, like=like)[:, None, :h, :w]  # (n, 1, h, w)
    crystals = torch.zeros(n, 1, h, w, device=like.device)
    for _ in range(2):
        seeds = (_uniform((n, 1, h, w), 0, 1, g, like) < 0.06).float()
        crystals = crystals + _motion_blur(seeds, 3, 1.5, _uniform((n,), -180, 180, g, like))
    texture = (0.3 + 0.45 * haze + 1.2 * crystals).clamp(0, 1)
    tint = like.new_tensor((0.85, 0.93, 1.0)).view(1, 3, 1, 1)
    if channels == 1:
        return texture * (tint * like.new_tensor(RGB_TO_GREY).view(1, 3, 1, 1)).sum()
    return texture * tint


# JPEG (ITU T.81 Annex K tables, libjpeg quality scaling)
_JPEG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
              14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
              18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_JPEG_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def _jpeg_table(base: tuple[int, ...], quality: int) -> Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float32)
    return torch.floor((table * scale + 50) / 100).clamp(1, 255).view(8, 8)


def _dct_matrix() -> Tensor:
    k = torch.arange(8, dtype=torch.float32)[:, None]
    n = torch.arange(8, dtype=torch.float32)[None]
    mat = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    mat[0] = math.sqrt(1 / 8)
    return mat


def _jpeg_plane(plane: Tensor, table: Tensor) -> Tensor:
    """Encode and decode ``(N, 1, H, W)`` samples in 0..255 (sides multiples of 8), quantised by ``table``."""
    n, _, h, w = plane.shape
    d = _dct_matrix().to(plane)
    blocks = (plane - 128).view(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # (N, H/8, W/8, 8, 8)
    coeffs = d @ blocks @ d.T
    q = table.to(plane)
    coeffs = torch.round(coeffs / q) * q
    blocks = d.T @ coeffs @ d + 128
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    n, c, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    x255 = F.pad(x * 255, (0, pw, 0, ph), mode="replicate")
    luma_table, chroma_table = _jpeg_table(_JPEG_LUMA, quality), _jpeg_table(_JPEG_CHROMA, quality)
    if c == 1:
        out = _jpeg_plane(x255, luma_table)
    else:
        r, g, b = x255[:, 0:1], x255[:, 1:2], x255[:, 2:3]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
        cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
        y = _jpeg_plane(y, luma_table)
        cb, cr = (F.interpolate(_jpeg_plane(F.avg_pool2d(p, 2), chroma_table), scale_factor=2,
                                mode="bilinear", align_corners=False) for p in (cb, cr))
        out = torch.cat([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], 1)
    return torch.round(out[..., :h, :w].clamp(0, 255)) / 255


# ------------------------------------------------------------------------------------------ corruptions


def _corruption(x: Tensor, name: str, s: int, g: torch.Generator | None) -> Tensor:
    n, c, h, w = x.shape
    if name == "gaussian_noise":
        return x + GAUSSIAN_NOISE[s] * _normal(tuple(x.shape), g, x)
    if name == "shot_noise":
        lam = SHOT_NOISE[s]
        dev = g.device if g is not None else x.device
        return torch.poisson((x * lam).to(dev), generator=g).to(x.device) / lam
    if name == "impulse_noise":
        hit = _uniform(tuple(x.shape), 0, 1, g, x) < IMPULSE_NOISE[s]
        salt = (_uniform(tuple(x.shape), 0, 1, g, x) < 0.5).to(x.dtype)
        return torch.where(hit, salt, x)
    if name == "defocus_blur":
        return _filter2d(x, _disk(*DEFOCUS[s]), "reflect")
    if name == "glass_blur":
        sigma, delta, iterations = GLASS[s]
        out = torch.floor(_gaussian_blur(x, sigma, truncate=4.0, mode="replicate").clamp(0, 1) * 255) / 255
        rows0 = torch.arange(delta + 1, h - delta + 1, device=x.device)  # rows/cols the reference visits
        cols0 = torch.arange(delta + 1, w - delta + 1, device=x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        dev = g.device if g is not None else x.device
        for _ in range(iterations):
            dy, dx = torch.randint(-delta, delta, (2, n, len(rows0), len(cols0)), generator=g,
                                   device=dev).to(x.device)
            src = out[batch, :, rows0[None, :, None] + dy, cols0[None, None, :] + dx].permute(0, 3, 1, 2)
            out = out.clone()
            out[:, :, delta + 1: h - delta + 1, delta + 1: w - delta + 1] = src  # (N, C, h', w')
        return _gaussian_blur(out, sigma, truncate=4.0, mode="replicate")
    if name == "motion_blur":
        radius, sigma = MOTION[s]
        return _motion_blur(x, radius, sigma, _uniform((n,), -45, 45, g, x))
    if name == "zoom_blur":
        factors = np.arange(1, ZOOM_STOP[s], 0.01)
        out = x.clone()
        for f in factors:
            out = out + _clipped_zoom(x, float(f))
        return out / (len(factors) + 1)
    if name == "snow":
        loc, scale, zoom, threshold, radius, sigma, blend = SNOW[s]
        layer = loc + scale * _normal((n, 1, h, w), g, x)
        layer = _clipped_zoom(layer, zoom)
        layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
        layer = torch.round(layer.clamp(0, 1) * 255) / 255
        layer = _motion_blur(layer, radius, sigma, _uniform((n,), -135, -45, g, x))
        layer = torch.round(layer * 255) / 255
        x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
        return x + layer + layer.flip(-1, -2)
    if name == "frost":
        weight_x, weight_frost = FROST[s]
        return weight_x * x + weight_frost * _frost_texture(n, c, h, w, g, x)
    if name == "fog":
        strength, decay = FOG[s]
        peak = x.flatten(1).max(1).values.view(n, 1, 1, 1)
        fog = plasma_fractal(n, _mapsize(h, w), decay, generator=g, like=x)[:, None, :h, :w]
        return (x + strength * fog) * peak / (peak + strength)
    if name == "brightness":
        # HSV: adding c to V = max(R, G, B) with H, S fixed scales RGB by V'/V (black becomes grey V').
        value = x.max(1, keepdim=True).values
        new_value = (value + BRIGHTNESS[s]).clamp(0, 1)
        return torch.where(value > 0, x * new_value / value.clamp_min(1e-12), new_value.expand_as(x))
    if name == "contrast":
        means = x.mean((2, 3), keepdim=True)
        return (x - means) * CONTRAST[s] + means
    if name == "elastic_transform":
        return _elastic(x, s, g)
    if name == "pixelate":
        small_h, small_w = int(h * PIXELATE[s]), int(w * PIXELATE[s])
        down_h, down_w = _box_matrix(h, small_h).to(x), _box_matrix(w, small_w).to(x)
        up_h, up_w = _box_matrix(small_h, h).to(x), _box_matrix(small_w, w).to(x)
        return (up_h @ down_h) @ x @ (up_w @ down_w).T
    if name == "jpeg_compression":
        return _jpeg(x, JPEG_QUALITY[s])
    raise AssertionError(name)  # unreachable: names are checked in corrupt()


def _elastic(x: Tensor, s: int, g: torch.Generator | None, *, affine: bool = True) -> Tensor:
    """Random affine warp of three points, then a smoothed random displacement field (reflect borders).

    ``affine=False`` keeps only the non-rigid displacement (used by the tests).
    """
    n, _, h, w = x.shape
    alpha, sigma, jitter = (v * min(h, w) for v in ELASTIC[s])
    cx, cy, half = float(w // 2), float(h // 2), float(min(h, w) // 3)
    pts = x.new_tensor([[cx + half, cy + half], [cx + half, cy - half],
                        [cx - half, cy - half]]).expand(n, 3, 2)  # (N, 3, 2) as (x, y)
    moved = pts + _uniform((n, 3, 2), -jitter, jitter, g, x) * float(affine)
    # the affine map from destination to source: source = A @ [dest, 1]
    ones = torch.ones(n, 3, 1, device=x.device)
    a = torch.linalg.solve(torch.cat([moved, ones], 2), pts).transpose(1, 2)  # (N, 2, 3)
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    dest = torch.stack([xx, yy, torch.ones_like(xx)], -1).view(1, h * w, 3)
    src = (dest @ a.transpose(1, 2)).view(n, h, w, 2)  # (N, H, W, 2) pixel coordinates (x, y)
    field = _uniform((n, 2, h, w), -1, 1, g, x)
    field = _gaussian_blur(field, sigma, truncate=3.0, mode="reflect") * alpha  # (N, 2, H, W): dx, dy
    src = src + field.permute(0, 2, 3, 1)
    grid = torch.stack([src[..., 0] / (w - 1), src[..., 1] / (h - 1)], -1) * 2 - 1
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def corrupt(x: Tensor, name: str, severity: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Apply the CIFAR-10-C corruption ``name`` at ``severity`` to a batch of images.

    Args:
        x: float images ``(N, C, H, W)`` in [0, 1], ``C`` in {1, 3}.
        name: one of :data:`CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        generator: the source of randomness (a seeded generator makes the output reproducible).

    Returns:
        ``(N, C, H, W)`` corrupted images in [0, 1], same dtype and device as ``x``.

    Raises:
        WeightlabError: unknown ``name`` (the message lists the valid ones), ``severity`` outside 1–5, or
            ``x`` not a float ``(N, C, H, W)`` tensor with C in {1, 3} and values in [0, 1].
    """
    if name not in CORRUPTIONS:
        raise WeightlabError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise WeightlabError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise WeightlabError(f"images must be a float tensor (N, C, H, W) with C in {{1, 3}}, got {shape}")
    if x.numel() == 0:
        return x.clone()
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1 or math.isnan(lo) or math.isnan(hi):
        raise WeightlabError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    out = _corruption(x.float(), name, severity - 1, generator)
    return out.clamp(0, 1).to(x.dtype)
