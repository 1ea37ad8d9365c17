"""Streaming merge of real checkpoints, one tensor at a time (paper key ``tall-masks``).

For each key the T task vectors are read into one ``(T, n)`` float32 buffer and combined in chunks, so peak
memory is about ``(T + 2) ×`` the largest tensor, whatever the model size. ``scope="global"`` TIES needs two
quantities over the whole model first: each task's trim threshold (found *exactly* by a two-level radix
select over the float32 bit patterns of ``|τ|``: two reading passes) and the majority sign (a third pass).
``scope="tensor"`` needs no extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import WeightlabError, warn
from weightlab.methods.merging.checkpoints import Checkpoint, check_output, open_all, write_like
from weightlab.methods.merging.consensus import check_k
from weightlab.methods.merging.tall_masks import check_lambda
from weightlab.methods.merging.task_arithmetic import check_finite
from weightlab.methods.merging.ties import check_ties_options
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.io import exclusive_output

METHODS = ("task-arithmetic", "ties", "consensus-ta", "consensus-ties")
CHUNK = 1 << 20  # elements per chunk of the elementwise stage
# the options each method reads (besides alpha); any other option given to it is ignored
OPTIONS_USED = {
    "task-arithmetic": frozenset(),
    "ties": frozenset({"density", "scope"}),
    "consensus-ta": frozenset({"k", "lam"}),
    "consensus-ties": frozenset({"k", "lam", "density", "scope"}),
}


def ignored_options(method: str, given: Sequence[str]) -> list[str]:
    """The options in ``given`` (``k``, ``lam``, ``density``, ``scope``) that ``method`` does not read."""
    return [o for o in given if o not in OPTIONS_USED[method]]


@dataclass(frozen=True)
class MergeConfig:
    """Options of a streamed merge (paper key ``tall-masks``; defaults from the reference code).

    Attributes:
        method: ``task-arithmetic`` (Σ τ), ``ties`` (disjoint mean), ``consensus-ta`` / ``consensus-ties``
            (TALL masks on Σ τ or on the TIES disjoint sum, then keep weights used by ≥ k tasks).
        alpha: scaling of the merged vector, in (0, 1].
        k: consensus threshold, 0 ≤ k ≤ T.
        density: TIES trim density in (0, 1].
        scope: TIES trimming (and majority sign) over the whole model (``global``) or per tensor.
        lambdas: TALL-mask λ for every task (one value, or one per task).
    """

    method: str = "ties"
    alpha: float = 1.0
    k: int = 2
    density: float = 0.2
    scope: str = "global"
    lambdas: tuple[float, ...] = (0.4,)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WeightlabError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (math.isfinite(self.alpha) and 0 < self.alpha <= 1):
            raise WeightlabError(f"alpha must be in (0, 1], got {self.alpha}")
        check_k(self.k)
        check_ties_options(self.density, "mean", self.scope)
        if not self.lambdas:
            raise WeightlabError("lambdas must hold at least one value")
        for lam in self.lambdas:
            check_lambda(lam)

    @property
    def uses_ties(self) -> bool:
        return self.method in ("ties", "consensus-ties")

    @property
    def reduce(self) -> str:
        return "mean" if self.method == "ties" else "sum"  # dis-sum inside TALL / Consensus (reference code)

    def lambdas_for(self, n_tasks: int) -> list[float]:
        if len(self.lambdas) == 1:
            return list(self.lambdas) * n_tasks
        if len(self.lambdas) != n_tasks:
            raise WeightlabError(f"expected one lambda or one per task ({n_tasks}), got {len(self.lambdas)}")
        return list(self.lambdas)


def read_vectors(base: Checkpoint, fts: Sequence[Checkpoint], key: str) -> tuple[Tensor, Tensor]:
    """The base tensor and the ``(T, n)`` float32 buffer of task vectors of ``key`` (checked finite)."""
    theta0 = base.read(key)
    base32 = theta0.reshape(-1).to(torch.float32)
    buf = torch.empty(len(fts), base32.numel(), dtype=torch.float32)
    for t, ft in enumerate(fts):
        x = ft.read(key).reshape(-1)
        if x.dtype == torch.float32:
            buf[t] = x
        else:
            buf[t].copy_(x)
        buf[t] -= base32
        check_finite(buf[t], key, f"checkpoint {str(ft.path)!r}")
    return theta0, buf


class InputCheck:
    """Notices, from the task vectors of one pass, fine-tunes identical to the base or to one another."""

    def __init__(self, base: Checkpoint, fts: Sequence[Checkpoint]) -> None:
        self.names = [str(ft.path) for ft in fts]
        real = [ft.path.resolve() for ft in fts]
        self.unchanged = {t for t in range(len(fts)) if real[t] != base.path.resolve()}  # (the base: warned)
        # pairs given as the same file were already warned about when the files were opened
        self.same = {(i, j) for i in range(len(fts)) for j in range(i + 1, len(fts)) if real[i] != real[j]}

    def observe(self, buf: Tensor) -> None:
        """Update with one key's task vectors ``(T, n)``."""
        self.unchanged = {t for t in self.unchanged if not bool(buf[t].any())}
        self.same = {(i, j) for i, j in self.same if torch.equal(buf[i], buf[j])}

    def warn(self) -> None:
        for t in sorted(self.unchanged):
            warn(f"fine-tuned checkpoint {self.names[t]!r} is identical to the base (its task vector is zero)")
        for i, j in sorted(self.same):
            if i not in self.unchanged:
                warn(f"checkpoints {self.names[i]!r} and {self.names[j]!r} are identical; each counts as a task")


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, max(n, 1), CHUNK)]


def global_thresholds(base: Checkpoint, fts: Sequence[Checkpoint], keys: list[str], density: float) -> Tensor:
    """Each task's exact trim threshold over the whole model ``(T,)`` (two reading passes)."""
    n_tasks = len(fts)
    rank = merge_ops.keep_rank(sum(base.numel(k) for k in keys), density)
    if rank <= 0:
        return torch.zeros(n_tasks)
    hi = torch.zeros(n_tasks, merge_ops.HIST_BINS, dtype=torch.long)
    for key in track(keys, "threshold pass 1/2"):
        _, buf = read_vectors(base, fts, key)
        for t in range(n_tasks):
            for c in _chunks(buf.shape[1]):
                hi[t] += merge_ops.radix_histogram(buf[t, c].abs())
    located = [merge_ops.locate_rank(hi[t], rank) for t in range(n_tasks)]
    lo = torch.zeros(n_tasks, 1 << 16, dtype=torch.long)
    for key in track(keys, "threshold pass 2/2"):
        _, buf = read_vectors(base, fts, key)
        for t in range(n_tasks):
            for c in _chunks(buf.shape[1]):
                lo[t] += merge_ops.radix_histogram(buf[t, c].abs(), prefix=located[t][0])
    values = [
        merge_ops.value_from_bits(located[t][0], merge_ops.locate_rank(lo[t], located[t][1])[0])
        for t in range(n_tasks)
    ]
    return torch.tensor(values, dtype=torch.float32)


def _raw_sign_sum(buf: Tensor, thresholds: Tensor) -> Tensor:
    total = torch.zeros((), dtype=torch.float32)
    for c in _chunks(buf.shape[1]):
        total += merge_ops.raw_sign(merge_ops.trim(buf[:, c], thresholds)).sum()
    return total


def global_majority(
    base: Checkpoint, fts: Sequence[Checkpoint], keys: list[str], thresholds: Tensor
) -> Tensor:
    """``sign(Σ γ)`` over the whole model (one reading pass)."""
    total = torch.zeros((), dtype=torch.float32)
    for key in track(keys, "majority-sign pass"):
        total += _raw_sign_sum(read_vectors(base, fts, key)[1], thresholds)
    return torch.sign(total)


def combine(
    buf: Tensor,
    config: MergeConfig,
    *,
    thresholds: Tensor | None = None,
    majority: Tensor | None = None,
    lambdas: Sequence[float] = (),
    reduce: str | None = None,
) -> Tensor:
    """The unscaled merged vector ``(n,)`` of one key from its task vectors ``buf`` ``(T, n)``.

    For ``scope="tensor"`` leave ``thresholds``/``majority`` None (computed from this tensor); ``reduce``
    overrides the method's TIES reduction.
    """
    reduce = reduce or config.reduce
    if config.uses_ties:
        if thresholds is None:
            thresholds = merge_ops.trim_thresholds(buf, config.density)
        if majority is None:
            majority = torch.sign(_raw_sign_sum(buf, thresholds))
    out = torch.empty(buf.shape[1], dtype=torch.float32)
    lam = torch.tensor(list(lambdas), dtype=torch.float32).reshape(-1, 1) if lambdas else None
    for c in _chunks(buf.shape[1]):
        part = buf[:, c]
        if config.uses_ties:
            trimmed = merge_ops.trim(part, thresholds)
            merged = merge_ops.disjoint_merge(trimmed, merge_ops.elect_sign(trimmed, majority), reduce)
        else:
            merged = part.sum(dim=0)
        if config.method.startswith("consensus"):
            masks = part.abs() > lam * (merged - part).abs()  # (T, chunk): the TALL masks
            merged = merged * merge_ops.consensus(masks, config.k)
        out[c] = merged
    return out


def merge_checkpoints(
    base: str | Path, finetuned: Sequence[str | Path], out: str | Path, config: MergeConfig = MergeConfig()
) -> Path:
    """Merge checkpoints on disk into ``out`` (the base's layout and dtypes; non-float keys copied).

    Returns:
        The output path.
    """
    out = check_output(out, [base, *finetuned])
    base_ckpt, fts = open_all(base, list(finetuned))
    try:
        if config.method.startswith("consensus") and config.k > len(fts):
            raise WeightlabError(
                f"k = {config.k} exceeds the {len(fts)} tasks (the merge would keep nothing)"
            )
        lambdas = config.lambdas_for(len(fts)) if config.method.startswith("consensus") else []
        keys = set(base_ckpt.float_keys())
        check = InputCheck(base_ckpt, fts)

        def produce(key: str) -> Tensor:
            if key not in keys:
                return base_ckpt.read(key)
            theta0, buf = read_vectors(base_ckpt, fts, key)
            check.observe(buf)
            merged = combine(buf, config, thresholds=thresholds, majority=majority, lambdas=lambdas)
            return merge_ops.apply_delta(theta0, merged.reshape(theta0.shape), config.alpha)

        with exclusive_output(out):
            thresholds = majority = None
            if config.uses_ties and config.scope == "global":
                ordered = base_ckpt.float_keys()
                thresholds = global_thresholds(base_ckpt, fts, ordered, config.density)
                majority = global_majority(base_ckpt, fts, ordered, thresholds)
            write_like(base_ckpt, out, produce, description=f"merge ({config.method})")
        check.warn()
    finally:
        base_ckpt.close()
        for ft in fts:
            ft.close()
    return out
