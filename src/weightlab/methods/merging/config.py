"""The options of a merge (paper key ``tall-masks``): one frozen :class:`MergeConfig` for the library, the
streaming kernel, the generic executor, recipes and the compression store.

Which options a method reads is in its entry of the table (:mod:`weightlab.methods.merging.methods`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from weightlab.errors import WeightlabError
from weightlab.methods.merging import methods
from weightlab.methods.merging.consensus import check_k
from weightlab.methods.merging.tall_masks import check_lambda
from weightlab.methods.merging.ties import check_ties_options

METHODS = methods.NAMES  # the merge-method table (methods.py) drives what a config accepts
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
