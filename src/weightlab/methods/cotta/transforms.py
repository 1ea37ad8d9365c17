"""CoTTA's test-time augmentations (``get_tta_transforms`` of ``qinenergy/cotta``, from KATANA), batched.

The reference applies to the whole batch tensor, in order: clip; colour jitter (brightness [0.6, 1.4],
contrast [0.7, 1.3], saturation [0.5, 1.5], hue [−0.06, 0.06], gamma [0.7, 1.3], in a random order); edge
padding by half the side; a random affine map (±15°, translation 1/16 of the padded side in whole pixels,
scale [0.9, 1.1], bilinear, zero fill); a 5×5 Gaussian blur (σ in [0.001, 0.5]); a centre crop back to the
side; a horizontal flip with probability 0.5; Gaussian noise (σ 0.005, per element); clip. One set of
parameters per batch and copy, as in the reference.

:func:`sample_params` draws the parameters of ``k`` copies at once; :func:`augment` applies them to a batch,
giving ``(k, B, C, H, W)``. Applying copy ``i`` alone (``params.select(i)``) gives exactly slice ``i``, which
is what lets the sequential and batched teacher passes agree. ``crop_first=True`` (default) samples only the
centre crop (plus the blur's 2-pixel margin) of the padded, warped image; ``crop_first=False`` warps and blurs
the whole padded image and crops afterwards as the reference does. Both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.errors import WeightlabError

GREY = (0.299, 0.587, 0.114)
BLUR_RADIUS = 2  # kernel size 5


@dataclass(frozen=True)
class AugmentParams:
    """Parameters of ``k`` augmented copies (one set per copy, shared by the batch)."""

    order: Tensor  # (k, 5) permutation of brightness, contrast, saturation, hue, gamma
    brightness: Tensor  # (k,)
    contrast: Tensor  # (k,)
    saturation: Tensor  # (k,)
    hue: Tensor  # (k,)
    gamma: Tensor  # (k,)
    angle: Tensor  # (k,) degrees
    translate: Tensor  # (k, 2) whole pixels of the padded image
    scale: Tensor  # (k,)
    sigma: Tensor  # (k,) blur
    flip: Tensor  # (k,) bool
    noise: Tensor  # (k, B, C, H, W), already multiplied by the noise std

    def select(self, i: int) -> AugmentParams:
        """The parameters of copy ``i`` alone (``k = 1``)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[i: i + 1] for f in fields(self)})

    def chunk(self, start: int, stop: int) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def __len__(self) -> int:
        return self.order.shape[0]


def sample_params(k: int, shape: tuple[int, ...], *, generator: torch.Generator, soft: bool = False,
                  noise_std: float = 0.005, flip_prob: float = 0.5,
                  device: torch.device | str = "cpu") -> AugmentParams:
    """Draw the parameters of ``k`` copies for a batch of ``shape`` ``(B, C, H, W)`` (``soft``: the milder
    ranges of the reference's ``soft=True``; ``flip_prob``: 0.5 in the reference, 0 for images such as
    digits whose mirror image is another class)."""
    gdev = generator.device

    def uniform(lo: float, hi: float, *size: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(k, *size, generator=generator, device=gdev)

    side = shape[-1] + 2 * (shape[-1] // 2)  # the padded side
    max_shift = side / 16
    order = torch.argsort(torch.rand(k, 5, generator=generator, device=gdev), dim=1)
    params = dict(
        order=order,
        brightness=uniform(0.8, 1.2) if soft else uniform(0.6, 1.4),
        contrast=uniform(0.85, 1.15) if soft else uniform(0.7, 1.3),
        saturation=uniform(0.75, 1.25) if soft else uniform(0.5, 1.5),
        hue=uniform(-0.03, 0.03) if soft else uniform(-0.06, 0.06),
        gamma=uniform(0.85, 1.15) if soft else uniform(0.7, 1.3),
        angle=uniform(-8, 8) if soft else uniform(-15, 15),
        translate=torch.round(uniform(-max_shift, max_shift, 2)),
        scale=uniform(0.95, 1.05) if soft else uniform(0.9, 1.1),
        sigma=uniform(0.001, 0.25) if soft else uniform(0.001, 0.5),
        flip=torch.rand(k, generator=generator, device=gdev) < flip_prob,
        noise=noise_std * torch.randn(k, *shape, generator=generator, device=gdev),
    )
    return AugmentParams(**{name: value.to(device) for name, value in params.items()})


# ------------------------------------------------------------------------------------------ colour


def _grey(x: Tensor) -> Tensor:
    """``(..., C, H, W)`` → ``(..., 1, H, W)`` luminance."""
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(-3)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(-3)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    delta = maxc - minc
    sat = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta == 0, torch.zeros_like(hue), hue)
    return torch.remainder(hue / 6.0, 1.0), sat, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sectors = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    choices = torch.stack([torch.stack(c, -3) for c in sectors])  # (6, ..., 3, H, W)
    return choices.gather(0, i.unsqueeze(-3).expand_as(choices[0]).unsqueeze(0)).squeeze(0)


def _colour_op(x: Tensor, op: int, factor: Tensor) -> Tensor:
    """One colour op on ``(k, B, C, H, W)`` with per-copy ``factor`` ``(k, 1, 1, 1, 1)``."""
    if op == 0:  # brightness
        return (x * factor).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of each image
        return _blend(x, _grey(x).mean((-3, -2, -1), keepdim=True), factor)
    if x.shape[-3] == 1 and op in (2, 3):  # saturation and hue leave grey images unchanged
        return x
    if op == 2:  # saturation
        return _blend(x, _grey(x), factor)
    if op == 3:  # hue
        h, s, v = _rgb_to_hsv(x)
        return _hsv_to_rgb(torch.remainder(h + factor.squeeze(-3), 1.0), s, v)
    return x.clamp(1e-8, 1.0).pow(factor).clamp(0, 1)  # gamma


def colour_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """Brightness, contrast, saturation, hue and gamma in each copy's own random order. A position where every
    copy applies the same op (always with one copy) runs it on the whole tensor; otherwise each op runs on its
    own copies (the same numbers either way: the ops act on each copy alone)."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue, params.gamma)
    order = params.order.tolist()  # (k, 5), one host read instead of 25 index searches
    for position in range(5):
        ops = [row[position] for row in order]
        if len(set(ops)) == 1:
            x = _colour_op(x, ops[0], factors[ops[0]].view(-1, 1, 1, 1, 1))
            continue
        out = x.clone()
        for op in sorted(set(ops)):
            idx = torch.tensor([i for i, o in enumerate(ops) if o == op], device=x.device)
            out[idx] = _colour_op(x[idx], op, factors[op][idx].view(-1, 1, 1, 1, 1))
        x = out
    return x


# ------------------------------------------------------------------------------------------ geometry


def _affine_grid(params: AugmentParams, side: int) -> Tensor:
    """``(k, side, side, 2)`` sampling grid of each copy's affine map (about the centre, inverse mapping)."""
    angle = torch.deg2rad(params.angle)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(len(params), 2, 3, device=angle.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos / params.scale, sin / params.scale
    theta[:, 1, 0], theta[:, 1, 1] = -sin / params.scale, cos / params.scale
    shift = params.translate / (side / 2)  # (k, 2) in normalised units
    theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    return F.affine_grid(theta, [len(params), 1, side, side], align_corners=False)


def _blur_valid(x: Tensor, sigma: Tensor) -> Tensor:
    """5×5 Gaussian blur without padding: ``(k, B, C, h, w)`` → ``(k, B, C, h − 4, w − 4)``."""
    d = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (d / sigma.view(-1, 1)) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).view(-1, 1, 1, 1, 1, 2 * BLUR_RADIUS + 1)
    h, w = x.shape[-2] - 2 * BLUR_RADIUS, x.shape[-1] - 2 * BLUR_RADIUS
    rows = sum(weights[..., j] * x[..., :, j: j + w] for j in range(2 * BLUR_RADIUS + 1))
    return sum(weights[..., j] * rows[..., j: j + h, :] for j in range(2 * BLUR_RADIUS + 1))


def augment(x: Tensor, params: AugmentParams, *, crop_first: bool = True) -> Tensor:
    """Apply ``params`` to the batch ``x`` ``(B, C, H, W)`` (square images): ``(k, B, C, H, W)``."""
    k = len(params)
    b, c, n, width = x.shape
    if n != width or n < 4:
        raise WeightlabError(f"CoTTA's augmentations need square images of side ≥ 4, got {n}×{width}")
    x = colour_jitter(x.clamp(0, 1).unsqueeze(0).expand(k, b, c, n, n), params)  # (k, B, C, H, W)
    pad = n // 2
    padded = F.pad(x.reshape(k * b, c, n, n), (pad, pad, pad, pad), mode="replicate")
    side = n + 2 * pad
    grid = _affine_grid(params, side)  # (k, side, side, 2)
    top = int(round((side - n) / 2))
    if crop_first:  # only the crop and the blur's margin
        grid = grid[:, top - BLUR_RADIUS: top + n + BLUR_RADIUS, top - BLUR_RADIUS: top + n + BLUR_RADIUS]
    grid = grid.unsqueeze(1).expand(k, b, *grid.shape[1:]).reshape(k * b, *grid.shape[1:])
    warped = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped.view(k, b, c, *warped.shape[-2:])
    if crop_first:
        out = _blur_valid(warped, params.sigma)
    else:
        r = BLUR_RADIUS
        full = F.pad(warped.view(k * b, c, side, side), (r, r, r, r), mode="reflect")
        full = full.view(k, b, c, side + 2 * r, side + 2 * r)
        out = _blur_valid(full, params.sigma)[..., top: top + n, top: top + n]
    out = torch.where(params.flip.view(k, 1, 1, 1, 1), out.flip(-1), out)
    return (out + params.noise).clamp(0, 1)
