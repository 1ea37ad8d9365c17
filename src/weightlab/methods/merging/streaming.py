"""Streaming merge of real checkpoints, one tensor at a time (paper key ``tall-masks``).

For each key the T task vectors are read into one ``(T, n)`` float32 buffer (a reused arena, the next key
read by a background thread while this one is computed: :mod:`~weightlab.methods.merging.vector_stream`)
and combined in one pass of cache-sized chunks, so peak memory is about ``(T + 2) ×`` the largest tensor
(``1.25 ×`` that at most with read-ahead), whatever the model size. Per-tensor thresholds are an exact
two-level radix select over the float32 bit patterns of ``|τ|`` (:func:`merge_ops.kth_smallest_magnitude`).
``scope="global"`` TIES needs two quantities over the whole model first: each task's trim threshold (the
same radix select, its histograms summed over the keys: two reading passes) and the majority sign (a third
pass). ``scope="tensor"`` needs no extra pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import WeightlabError, warn
from weightlab.methods.merging.checkpoints import Checkpoint, check_output, open_all, write_like
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.vector_stream import KeyVectors, VectorStream
from weightlab.methods.merging.workers import SERIAL, ColumnWorkers
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.io import exclusive_output

PREFIX = 1024  # entries compared first when looking for identical inputs
CHUNK = 1 << 16  # entries per row of a chunk of the elementwise stage: (T, CHUNK) float32 stays in cache


def read_vectors(base: Checkpoint, fts: Sequence[Checkpoint], key: str) -> tuple[Tensor, Tensor]:
    """The base tensor and the ``(T, n)`` float32 buffer of task vectors of ``key`` (checked finite)."""
    with VectorStream(base, fts, [key], read_ahead=False) as stream:
        item = next(iter(stream))
    return item.theta0, item.vectors


def apply_merged(item: KeyVectors, merged: Tensor, alpha: float) -> Tensor:
    """``θ_0 + α · merged`` in the base's dtype and shape (:func:`merge_ops.apply_delta`), computed in place
    on ``merged`` ``(n,)`` when the base's compute dtype is float32."""
    theta0 = item.theta0
    delta = merged.reshape(theta0.shape)
    in_place = merge_ops.compute_dtype(theta0.dtype) == torch.float32
    return merge_ops.apply_delta(theta0, delta, alpha, out=delta if in_place else None)


class InputCheck:
    """Notices, from the task vectors of one pass, fine-tunes identical to the base or to one another."""

    def __init__(self, base: Checkpoint, fts: Sequence[Checkpoint]) -> None:
        self.names = [str(ft.path) for ft in fts]
        real = [ft.path.resolve() for ft in fts]
        self.unchanged = {t for t in range(len(fts)) if real[t] != base.path.resolve()}  # (the base: warned)
        # pairs given as the same file were already warned about when the files were opened
        self.same = {(i, j) for i in range(len(fts)) for j in range(i + 1, len(fts)) if real[i] != real[j]}

    def observe(self, buf: Tensor) -> None:
        """Update with one key's task vectors ``(T, n)`` (a short prefix settles almost every case)."""
        head = buf[:, :PREFIX]
        self.unchanged = {t for t in self.unchanged if not bool(head[t].any()) and not bool(buf[t].any())}
        self.same = {(i, j) for i, j in self.same if torch.equal(head[i], head[j]) and torch.equal(buf[i], buf[j])}

    def warn(self) -> None:
        for t in sorted(self.unchanged):
            warn(f"fine-tuned checkpoint {self.names[t]!r} is identical to the base (its task vector is zero)")
        for i, j in sorted(self.same):
            if i not in self.unchanged:
                warn(f"checkpoints {self.names[i]!r} and {self.names[j]!r} are identical; each counts as a task")


def _chunks(n: int, start: int = 0) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(start, max(n, start + 1), CHUNK)]


def _radix_counts(buf: Tensor, bins: list[int] | None, workers: ColumnWorkers) -> Tensor:
    """:func:`merge_ops.radix_counts` of ``buf`` ``(T, n)``, its column blocks counted in parallel."""
    return sum(workers.map(lambda b: merge_ops.radix_counts(buf[:, b], bins), buf.shape[1]))


def tensor_thresholds(buf: Tensor, density: float, workers: ColumnWorkers = SERIAL) -> Tensor:
    """:func:`merge_ops.trim_thresholds` of ``buf`` ``(T, n)`` (the same values), on ``workers``."""
    rank = merge_ops.keep_rank(buf.shape[1], density)
    if rank <= 0 or buf.dtype != torch.float32:
        return merge_ops.trim_thresholds(buf, density)
    high = _radix_counts(buf, None, workers)
    return merge_ops.select_from_counts(high, [rank] * buf.shape[0], lambda bins: _radix_counts(buf, bins, workers))


def global_thresholds(
    base: Checkpoint,
    fts: Sequence[Checkpoint],
    keys: list[str],
    density: float,
    *,
    stream: VectorStream | None = None,
    workers: ColumnWorkers = SERIAL,
) -> Tensor:
    """Each task's exact trim threshold over the whole model ``(T,)`` (two reading passes).

    A two-level radix select whose per-row histograms add up over the keys; ``stream`` (over ``keys``)
    reuses an open :class:`VectorStream` and its buffers.
    """
    n_tasks = len(fts)
    rank = merge_ops.keep_rank(sum(base.numel(k) for k in keys), density)
    if rank <= 0:
        return torch.zeros(n_tasks)
    with contextlib.ExitStack() as stack:
        vectors = stream or stack.enter_context(VectorStream(base, fts, keys))
        high = torch.zeros(n_tasks, merge_ops.HIST_BINS, dtype=torch.long)
        for item in track(vectors, "threshold pass 1/2"):
            high += _radix_counts(item.vectors, None, workers)

        def low_counts(bins: list[int]) -> Tensor:
            low = torch.zeros(n_tasks, 1 << 16, dtype=torch.long)
            for item in track(vectors, "threshold pass 2/2"):
                low += _radix_counts(item.vectors, bins, workers)
            return low

        return merge_ops.select_from_counts(high, [rank] * n_tasks, low_counts)


def _raw_sign_sum(buf: Tensor, thresholds: Tensor, workers: ColumnWorkers = SERIAL) -> Tensor:
    """``Σ sign(Σ_t τ̂_t)`` over one key's task vectors ``(T, n)`` (exact: counted as integers)."""
    shrink = merge_ops.shrink_lambdas(thresholds.to(torch.float32))

    def block(cols: slice) -> int:
        scratch = torch.empty(buf.shape[0], min(CHUNK, cols.stop - cols.start))
        balance = 0
        for c in _chunks(cols.stop, cols.start):
            total = merge_ops.trim_into(scratch[:, : c.stop - c.start], buf[:, c], shrink).sum(dim=0)
            balance += int(torch.sign(total).sum())  # exact: a sum of at most CHUNK (< 2**24) signs
        return balance

    return torch.tensor(float(sum(workers.map(block, buf.shape[1]))))


def global_majority(
    base: Checkpoint,
    fts: Sequence[Checkpoint],
    keys: list[str],
    thresholds: Tensor,
    *,
    stream: VectorStream | None = None,
    workers: ColumnWorkers = SERIAL,
) -> Tensor:
    """``sign(Σ γ)`` over the whole model (one reading pass)."""
    balance = 0.0
    with contextlib.ExitStack() as stack:
        vectors = stream or stack.enter_context(VectorStream(base, fts, keys))
        for item in track(vectors, "majority-sign pass"):
            balance += float(_raw_sign_sum(item.vectors, thresholds, workers))
    return torch.sign(torch.tensor(balance))


def _ties_chunk(
    part: Tensor, scratch: Tensor, shrink: list[float], tie: float, reduce: str
) -> tuple[Tensor, Tensor]:
    """TIES on a chunk ``(T, c)``: ``(Σ_t τ̂_t, disjoint mean/sum)``, both ``(c,)``; ``tie`` is the sign of
    entries whose sum is 0 (the majority sign). Uses ``scratch`` ``(T, ≥ c)``."""
    trimmed = merge_ops.trim_into(scratch[:, : part.shape[1]], part, shrink)
    total = trimmed.sum(dim=0)
    return total, merge_ops.disjoint_merge_(trimmed, merge_ops.effective_sign(total, tie), reduce)


def _consensus_chunk(merged: Tensor, part: Tensor, lam: Tensor, k: int, scratch: Tensor) -> Tensor:
    """``merged`` ``(c,)`` kept where ≥ ``k`` TALL masks ``|τ_t| > λ_t |merged − τ_t|`` agree (``part`` ``(T, c)``;
    ``scratch`` ``(2, T, ≥ c)``)."""
    width = part.shape[1]
    spread = torch.sub(merged, part, out=scratch[0, :, :width]).abs_().mul_(lam)  # λ_t |merged − τ_t|
    masks = torch.abs(part, out=scratch[1, :, :width]) > spread  # (T, c)
    return merged * merge_ops.consensus(masks, k)


@dataclass(frozen=True)
class _Plan:
    """What every chunk of one key's combine needs."""

    consensus: bool  # keep only the weights that ≥ k tasks' TALL masks use
    k: int
    reduce: str
    shrink: list[float] | None  # TIES trim λ per task (None: no trimming)
    tie: float  # sign of entries whose trimmed sum is 0
    lam: Tensor | None  # (T, 1) TALL-mask λ

    def chunk(self, part: Tensor, scratch: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(Σ_t τ̂_t or None, merged vector, result)`` of one chunk ``(T, c)`` (the result is the merged
        vector after the consensus mask, if any)."""
        total = None
        if self.shrink is None:
            merged = part.sum(dim=0)
        else:
            total, merged = _ties_chunk(part, scratch[0], self.shrink, self.tie, self.reduce)
        if self.consensus:
            return total, merged, _consensus_chunk(merged, part, self.lam, self.k, scratch)
        return total, merged, merged

    def block(self, buf: Tensor, cols: slice, out: Tensor) -> tuple[int, Tensor]:
        """Merge columns ``cols`` of ``buf`` into ``out``; the sign balance of ``Σ_t τ̂_t`` and the columns
        whose sum is 0 although a task touches them (their result depends on the majority sign)."""
        scratch = torch.empty(2, buf.shape[0], min(CHUNK, max(cols.stop - cols.start, 1)))
        balance, undecided = 0, [torch.zeros(0, dtype=torch.long)]
        for c in _chunks(cols.stop, cols.start):
            total, merged, result = self.chunk(buf[:, c], scratch)
            out[c] = result
            if total is not None:
                sign = torch.sign(total)  # (c,)
                balance += int(sign.sum())  # exact: a sum of at most CHUNK (< 2**24) signs
                undecided.append(torch.nonzero(torch.where(sign == 0, merged, 0.0)).reshape(-1) + c.start)
        return balance, torch.cat(undecided)


def combine(
    buf: Tensor,
    config: MergeConfig,
    *,
    thresholds: Tensor | None = None,
    majority: Tensor | None = None,
    lambdas: Sequence[float] = (),
    reduce: str | None = None,
    workers: ColumnWorkers = SERIAL,
) -> Tensor:
    """The unscaled merged vector ``(n,)`` of one key from its task vectors ``buf`` ``(T, n)``.

    For ``scope="tensor"`` leave ``thresholds``/``majority`` None (computed from this tensor); ``reduce``
    overrides the method's TIES reduction; ``workers`` share the column blocks. One pass over ``buf`` in
    cache-sized chunks: without a given majority, an entry whose trimmed sum is exactly 0 is first merged
    with sign +1, and the few of those that any task touches are merged again if this tensor's majority
    sign turns out ≤ 0.
    """
    n = buf.shape[1]
    shrink = None
    if config.uses_ties:
        if thresholds is None:
            thresholds = tensor_thresholds(buf, config.density, workers)
        shrink = merge_ops.shrink_lambdas(thresholds.to(torch.float32))
    lam = torch.tensor(list(lambdas), dtype=torch.float32).reshape(-1, 1) if lambdas else None
    tie = 1.0 if majority is None else float(majority)
    plan = _Plan(config.uses_consensus, config.k, reduce or config.reduce, shrink, tie, lam)
    out = torch.empty(n, dtype=torch.float32)
    results = workers.map(lambda cols: plan.block(buf, cols, out), n)
    if shrink is not None and majority is None and sum(b for b, _ in results) <= 0:
        index = torch.cat([u for _, u in results])  # the tensor's majority sign is not +1: redo those
        if index.numel():
            part = buf[:, index]  # (T, ties)
            redo = _Plan(config.uses_consensus, config.k, plan.reduce, shrink, -1.0, lam)
            out[index] = redo.chunk(part, torch.empty(2, *part.shape))[2]
    return out


def merge_checkpoints(
    base: str | Path,
    finetuned: Sequence[str | Path],
    out: str | Path,
    config: MergeConfig = MergeConfig(),
    *,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Merge checkpoints on disk into ``out`` (the base's layout and dtypes; non-float keys copied).

    ``provenance``: files (``merge_config.yaml``, ``README.md``) for a folder output, metadata for a file.

    Returns:
        The output path.
    """
    if not config.fits_kernel(len(finetuned)):
        raise WeightlabError(f"the streaming kernel does not implement this {config.method!r} merge (it runs the "
                             "paper's methods with unit weights); use weightlab.merging.merge_checkpoints")
    out = check_output(out, [base, *finetuned])
    base_ckpt, fts = open_all(base, list(finetuned))
    try:
        if config.uses_consensus and config.k > len(fts):
            raise WeightlabError(
                f"k = {config.k} exceeds the {len(fts)} tasks (the merge would keep nothing)"
            )
        lambdas = config.lambdas_for(len(fts)) if config.uses_consensus else []
        ordered = base_ckpt.float_keys()
        keys = set(ordered)
        check = InputCheck(base_ckpt, fts)

        def produce(key: str) -> Tensor:
            if key not in keys:
                return base_ckpt.read(key)
            item = next(items)
            if item.key != key:
                raise RuntimeError(f"merge asked for {key!r} but the stream holds {item.key!r}")
            check.observe(item.vectors)
            merged = combine(item.vectors, config, thresholds=thresholds, majority=majority, lambdas=lambdas,
                             workers=workers)
            return apply_merged(item, merged, config.alpha)

        with (exclusive_output(out), VectorStream(base_ckpt, fts, ordered) as stream, ColumnWorkers() as workers,
              workers.serial_caller()):
            thresholds = majority = None
            if config.uses_ties and config.scope == "global":
                thresholds = global_thresholds(base_ckpt, fts, ordered, config.density, stream=stream,
                                               workers=workers)
                majority = global_majority(base_ckpt, fts, ordered, thresholds, stream=stream, workers=workers)
            items = iter(stream)
            write_like(base_ckpt, out, produce, description=f"merge ({config.method})",
                       provenance=provenance)
        check.warn()
    finally:
        base_ckpt.close()
        for ft in fts:
            ft.close()
    return out
