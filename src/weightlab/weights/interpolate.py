"""Interpolating between models: the weighted average (``linear``) and spherical interpolation (``slerp``).

Pure functions over the tensors of one key; they return new tensors and never modify their inputs.
``linear`` works in float32 (float64 for float64 inputs) with the operations mergekit uses (``addcmul``
of ``w_i · θ_i`` into zeros, in order, then one division by ``Σ w_i``), so the same weights give the same
bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DOT_THRESHOLD = 0.9995  # |cos| above this: the two tensors are (anti)parallel, interpolate linearly
EPS = 1e-8


def linear(models: Tensor, weights: Tensor, *, normalize: bool = True) -> Tensor:
    """``Σ_i w_i θ_i`` (divided by ``Σ_i w_i`` when ``normalize``) over a stack ``(M, ...)`` -> ``(...)``.

    Args:
        models: the M models' tensors of one key, stacked.
        weights: ``(M,)`` one weight per model (negative weights subtract a model).
        normalize: divide by the sum of the weights (a weighted mean, Wortsman et al.'s model soup).
    """
    dtype = torch.float64 if models.dtype == torch.float64 else torch.float32
    result = torch.zeros(models.shape[1:], dtype=dtype, device=models.device)
    w = weights.to(dtype=dtype, device=models.device)
    for theta, coefficient in zip(models, w):
        result.addcmul_(theta, coefficient)
    return result.div_(w.sum()) if normalize else result


def slerp(t: float, a: Tensor, b: Tensor, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS) -> Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), each tensor taken as one vector.

    The angle Ω comes from the normalised tensors; the result ``sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``
    uses the tensors themselves, so their norms are interpolated too (as mergekit and Shoemake's SLERP). Nearly
    parallel or antiparallel tensors (``|cos Ω| > dot_threshold``) and zero tensors fall back to ``lerp``.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.to(dtype), b.to(dtype)
    norm_x, norm_y = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if norm_x <= eps or norm_y <= eps:
        return (1 - t) * x + t * y
    dot = float(((x / norm_x) * (y / norm_y)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * x + t * y
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * x + (math.sin(t * omega) / sin_omega) * y
