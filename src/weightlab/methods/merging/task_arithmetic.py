"""Task vectors, task arithmetic and applying a (masked, scaled) vector to a base (paper key ``tall-masks``).

State dicts are ``dict[str, Tensor]``. Task vectors cover the floating-point keys of the base; integer
buffers (``num_batches_tracked``) and keys absent from a vector are copied from the base by :func:`apply`.
No function here modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.weights import merge_ops

StateDict = dict[str, Tensor]


def describe_mismatches(
    base: Mapping[str, Tensor] | Mapping[str, tuple], other: Mapping, name: str, *, limit: int = 3
) -> str | None:
    """A message naming the first ``limit`` keys whose presence, shape or dtype differ, with the total count.

    Values are tensors or ``(dtype, shape)`` pairs. Returns None when everything matches.
    """

    def sig(v: object) -> tuple[str, tuple[int, ...]]:
        if isinstance(v, Tensor):
            return str(v.dtype).replace("torch.", ""), tuple(v.shape)
        dtype, shape = v  # type: ignore[misc]
        return str(dtype).replace("torch.", ""), tuple(shape)

    problems = [f"{k!r} missing" for k in base if k not in other]
    problems += [f"{k!r} not in the base" for k in other if k not in base]
    for k in base:
        if k in other and sig(base[k]) != sig(other[k]):
            (d0, s0), (d1, s1) = sig(base[k]), sig(other[k])
            problems.append(f"{k!r} is {d1} {list(s1)}, base has {d0} {list(s0)}")
    if not problems:
        return None
    return (
        f"{name} does not match the base in {len(problems)} tensor(s) (first: {'; '.join(problems[:limit])})"
    )


def check_finite(tensor: Tensor, key: str, source: str) -> None:
    """Raise when ``tensor`` holds NaN or Inf (named by ``key`` and ``source``)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise WeightlabError(
            f"task vector of {source} has {bad} NaN/Inf value(s) in {key!r}; expected finite weights"
        )


def task_vectors(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]) -> list[StateDict]:
    """``τ_t = θ_t − θ_0`` for every fine-tuned state dict (float keys only; float32 or float64).

    Raises:
        WeightlabError: a state dict's keys, shapes or dtypes differ from the base, or a τ is not finite.
    """
    out = []
    for i, ft in enumerate(finetuned):
        problem = describe_mismatches(base, ft, f"fine-tuned model {i}")
        if problem:
            raise WeightlabError(problem)
        tau = {k: merge_ops.task_vector(v, ft[k]) for k, v in base.items() if v.is_floating_point()}
        for k, v in tau.items():
            check_finite(v, k, f"fine-tuned model {i}")
        out.append(tau)
    return out


def stack(vectors: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """The ``(T, ...)`` stack of one key over task vectors."""
    return torch.stack([v[key] for v in vectors])


def check_vectors(vectors: Sequence[Mapping[str, Tensor]], *, minimum: int = 1) -> list[str]:
    """The common keys of ``vectors`` (which must share keys and shapes); at least ``minimum`` vectors."""
    if len(vectors) < minimum:
        raise WeightlabError(f"expected at least {minimum} task vector(s), got {len(vectors)}")
    keys = list(vectors[0])
    for i, v in enumerate(vectors[1:], start=1):
        problem = describe_mismatches(vectors[0], v, f"task vector {i}")
        if problem:
            raise WeightlabError(problem.replace("the base", "task vector 0"))
    return keys


def task_arithmetic(vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """The multi-task vector ``τ_MTL = Σ_t τ_t`` (Ilharco et al.; unscaled: scale with :func:`apply`)."""
    keys = check_vectors(vectors)
    return {k: stack(vectors, k).sum(dim=0) for k in keys}


def check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha):
        raise WeightlabError(f"alpha must be a finite number, got {alpha}")


def apply(
    base: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    alpha: float = 1.0,
    mask: Mapping[str, Tensor] | None = None,
) -> StateDict:
    """``θ_0 + α · (mask ∘ vector)``; keys without a vector are copied from ``base``; dtypes of ``base`` kept.

    Args:
        base: the pretrained state dict θ_0.
        vector: a (multi-)task vector over some keys of ``base``.
        alpha: the scaling coefficient (the paper's α).
        mask: an optional bool state dict over the keys of ``vector``.
    """
    check_alpha(alpha)
    extra = [k for k in vector if k not in base]
    if extra:
        raise WeightlabError(f"the vector has {len(extra)} key(s) not in the base (first: {extra[0]!r})")
    out = {}
    for k, v in base.items():
        if k not in vector:
            out[k] = v.clone()
            continue
        if tuple(vector[k].shape) != tuple(v.shape):
            raise WeightlabError(f"vector {k!r} has shape {list(vector[k].shape)}, base has {list(v.shape)}")
        m = None if mask is None else mask[k]
        out[k] = merge_ops.apply_delta(v, vector[k], alpha, m)
    return out
