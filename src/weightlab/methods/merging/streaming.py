"""Streaming merge of real checkpoints, one tensor at a time (paper key ``tall-masks``).

For each key the T task vectors are read into one ``(T, n)`` float32 buffer and combined in chunks, so peak
memory is about ``(T + 2) ×`` the largest tensor, whatever the model size. ``scope="global"`` TIES needs two
quantities over the whole model first: each task's trim threshold (found *exactly* by a two-level radix
select over the float32 bit patterns of ``|τ|``: two reading passes) and the majority sign (a third pass).
``scope="tensor"`` needs no extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import WeightlabError, warn
from weightlab.methods.merging import methods
from weightlab.methods.merging.checkpoints import Checkpoint, check_output, open_all, write_like
from weightlab.methods.merging.consensus import check_k
from weightlab.methods.merging.tall_masks import check_lambda
from weightlab.methods.merging.task_arithmetic import check_finite
from weightlab.methods.merging.ties import check_ties_options
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.io import exclusive_output

METHODS = methods.NAMES  # the merge-method table (methods.py) drives what a config accepts
KERNEL_METHODS = tuple(m.name for m in methods.TABLE if m.kernel)  # the ones ``combine`` implements
CHUNK = 1 << 20  # elements per chunk of the elementwise stage
# the options each method reads (besides alpha); any other option given to it is ignored
OPTIONS_USED = {m.name: m.reads - {"alpha"} for m in methods.TABLE}
CONVENTIONS = ("reference", "mergekit")


def ignored_options(method: str, given: Sequence[str]) -> list[str]:
    """The options in ``given`` (``k``, ``lam``, ``density``, ``scope``, ...) that ``method`` does not read."""
    return [o for o in given if o not in OPTIONS_USED[method]]


def _check_numbers(name: str, values: Sequence[float], *, low: float | None = None, high: float | None = None,
                   low_open: bool = False) -> None:
    for v in values:
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        bad = bad or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
        if bad:
            span = f"in {'(' if low_open else '['}{low}, {high}]" if low is not None else "a finite number"
            raise WeightlabError(f"{name} must be {span}, got {v!r}")


@dataclass(frozen=True)
class MergeConfig:
    """Options of a merge, streamed or in memory (paper key ``tall-masks``; defaults from the reference code).

    Which options a method reads is in its entry of the table (:mod:`weightlab.methods.merging.methods`).

    Attributes:
        method: a name of the table: ``task-arithmetic``, ``linear``, ``ties``, ``dare-ta``, ``dare-ties``,
            ``breadcrumbs``, ``breadcrumbs-ties``, ``slerp``, ``consensus-ta``, ``consensus-ties``.
        alpha: scaling of the merged task vector (mergekit's ``lambda``); any finite number (> 1 amplifies).
        k: consensus threshold, 0 ≤ k ≤ T.
        density: the fraction ρ of each task vector kept (TIES, DARE, Breadcrumbs), in (0, 1].
        scope: TIES trimming (and majority sign) over the whole model (``global``) or per tensor.
        lambdas: TALL-mask λ for every task (one value, or one per task).
        weights: per-model weights w_t (one value or one per model; negative: task negation).
        densities: per-model densities overriding ``density`` (one value or one per model; empty: none).
        seed: DARE's random drops derive from it (and the key and model), so a merge is reproducible.
        gamma: Model Breadcrumbs: the fraction of largest-magnitude entries dropped, in [0, 1).
        t: SLERP position from the base (0) to the model (1).
        normalize: divide by the sum of the weights (None: the method's default, False except ``linear``).
        rescale: DARE rescales the kept entries by 1/ρ.
        convention: TIES as the ``reference`` code of the paper runs it, or as ``mergekit`` does (per tensor,
            exactly ⌊ρd⌋ kept, zero sums elect +, weighted); see docs/merging.md.
    """

    method: str = "ties"
    alpha: float = 1.0
    k: int = 2
    density: float = 0.2
    scope: str = "global"
    lambdas: tuple[float, ...] = (0.4,)
    weights: tuple[float, ...] = (1.0,)
    densities: tuple[float, ...] = ()
    seed: int = 0
    gamma: float = 0.01
    t: float = 0.5
    normalize: bool | None = None
    rescale: bool = True
    convention: str = "reference"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WeightlabError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise WeightlabError(f"alpha must be a finite number, got {self.alpha}")
        check_k(self.k)
        check_ties_options(self.density, "mean", self.scope)
        if not self.lambdas:
            raise WeightlabError("lambdas must hold at least one value")
        for lam in self.lambdas:
            check_lambda(lam)
        if not self.weights:
            raise WeightlabError("weights must hold at least one value")
        _check_numbers("a weight", self.weights)
        _check_numbers("density", self.densities, low=0.0, high=1.0, low_open=True)
        _check_numbers("gamma", [self.gamma], low=0.0, high=1.0)
        if self.gamma >= 1:
            raise WeightlabError(f"gamma must be in [0, 1), got {self.gamma}")
        _check_numbers("t", [self.t], low=0.0, high=1.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise WeightlabError(f"seed must be an integer ≥ 0, got {self.seed!r}")
        if self.convention not in CONVENTIONS:
            raise WeightlabError(f"convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        self._check_convention()

    def _check_convention(self) -> None:
        if self.method != "ties":
            return
        if self.convention == "mergekit" and self.scope != "tensor":
            raise WeightlabError("ties with convention mergekit trims per tensor; set scope to tensor (got "
                                 f"{self.scope!r})")
        if self.convention == "reference" and (set(self.weights) != {1.0} or len(set(self.densities)) > 1):
            raise WeightlabError("ties with convention reference (the paper's code) takes no per-model weights or "
                                 "densities; set convention to mergekit to use them")

    @property
    def spec(self) -> methods.MergeMethod:
        """The method's entry in the table."""
        return methods.get(self.method)

    @property
    def uses_ties(self) -> bool:
        return self.method in ("ties", "consensus-ties")

    @property
    def uses_consensus(self) -> bool:
        return self.method in ("consensus-ta", "consensus-ties")

    @property
    def global_scope(self) -> bool:
        """TIES over the whole model: thresholds and majority sign need passes before the merge."""
        return self.uses_ties and self.scope == "global"

    @property
    def reduce(self) -> str:
        return "mean" if self.method == "ties" else "sum"  # dis-sum inside TALL / Consensus (reference code)

    @property
    def normalized(self) -> bool:
        """Whether weighted sums are divided by the sum of the weights (``normalize``, or the method's default)."""
        return self.method == "linear" if self.normalize is None else self.normalize

    def fits_kernel(self, n_tasks: int) -> bool:
        """Whether the streaming kernel (``combine``) computes this merge: paper conventions, unit weights."""
        return (self.spec.kernel and self.convention == "reference" and self.weights_for(n_tasks) == [1.0] * n_tasks
                and not self.normalized and len(set(self.densities_for(n_tasks))) == 1
                and self.densities_for(n_tasks)[0] == self.density)

    def lambdas_for(self, n_tasks: int) -> list[float]:
        return _per_model("lambda", self.lambdas, n_tasks)

    def weights_for(self, n_tasks: int) -> list[float]:
        return _per_model("weight", self.weights, n_tasks)

    def densities_for(self, n_tasks: int) -> list[float]:
        return _per_model("density", self.densities or (self.density,), n_tasks)


def _per_model(name: str, values: Sequence[float], n_tasks: int) -> list[float]:
    if len(values) == 1:
        return [float(values[0])] * n_tasks
    if len(values) != n_tasks:
        raise WeightlabError(f"expected one {name} or one per task ({n_tasks}), got {len(values)}")
    return [float(v) for v in values]


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
        if config.uses_consensus:
            masks = part.abs() > lam * (merged - part).abs()  # (T, chunk): the TALL masks
            merged = merged * merge_ops.consensus(masks, config.k)
        out[c] = merged
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
            write_like(base_ckpt, out, produce, description=f"merge ({config.method})", provenance=provenance)
        check.warn()
    finally:
        base_ckpt.close()
        for ft in fts:
            ft.close()
    return out
