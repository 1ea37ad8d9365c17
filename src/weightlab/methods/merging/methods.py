"""The table of merge methods: one vocabulary for the library, the streaming CLI, recipes and the store.

Each method is a :class:`MergeMethod`: a few lines over the pure ops of :mod:`weightlab.weights` that merge
one key (a :class:`Group`: the base tensor and the models' tensors, flat, float32), the options it reads,
and the mergekit ``merge_method`` it reproduces. Every entry is registered under the registry kind
``"merge"``; :func:`get` looks one up (the error names the closest names). The executor
(:mod:`weightlab.methods.merging.execute`) runs a rule key by key over checkpoints on disk or state dicts in
memory; the four paper methods (``task-arithmetic``, ``ties``, ``consensus-ta``, ``consensus-ties``) also
have the fast streaming kernel of :mod:`weightlab.methods.merging.streaming`, which gives the same bits.

Paper keys: ``tall-masks`` (task arithmetic, TIES, Consensus; Wang et al. 2024), ``dare`` (Yu et al.
2024), ``breadcrumbs`` (Davari & Belilovsky 2023), ``model-soups`` (linear; Wortsman et al. 2022), SLERP
(Shoemake 1985, as mergekit uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from weightlab.registry import get as registry_get
from weightlab.registry import register
from weightlab.utils import derive_seed
from weightlab.weights import interpolate, merge_ops, sparsify
from weightlab.weights.weighted_merge import column, weighted_sum

if TYPE_CHECKING:
    from weightlab.methods.merging.config import MergeConfig

KIND = "merge"


@dataclass
class Group:
    """One key of a merge: the base's tensor ``(n,)`` and the models' ``(T, n)``, float32, on one device."""

    key: str
    base: Tensor  # (n,)
    models: Tensor  # (T, n)

    @cached_property
    def deltas(self) -> Tensor:
        """The task vectors ``τ_t = θ_t − θ_0`` ``(T, n)``."""
        return self.models - self.base


@dataclass(frozen=True)
class Context:
    """What a merge resolves once: its config, per-model values and whole-model statistics (global TIES)."""

    config: MergeConfig
    weights: Tensor  # (T,)
    densities: tuple[float, ...]
    lambdas: Tensor  # (T, 1)
    thresholds: Tensor | None = None  # (T,) global TIES trim thresholds
    majority: Tensor | None = None  # () global TIES majority sign


Rule = Callable[[Group, Context], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method of the table.

    Attributes:
        name: the one name used by the library, the CLI (``--method``), recipes and stores.
        summary: one line for ``--help`` and the docs.
        rule: merges one key: ``rule(group, context)`` -> the merged weights ``(n,)`` (float32).
        reads: the options it reads (``alpha``, ``weights``, ``density``, ``k``, ``lam``, ...).
        mergekit: the mergekit ``merge_method`` it reproduces (a recipe may use that name).
        models: fewest and most fine-tuned models (besides the base; None: no limit).
        strength: the option whose 0 gives the base back (None: no such option).
        kernel: the streaming kernel implements it (paper conventions, unit weights).
        store: can be the multi-task vector of a TALL-mask compression store.
        recipe_defaults: option values a recipe gets when it does not set them (mergekit's defaults).
    """

    name: str
    summary: str
    rule: Rule
    reads: frozenset[str]
    mergekit: str | None = None
    models: tuple[int, int | None] = (2, None)
    strength: str | None = "alpha"
    kernel: bool = False
    store: bool = False
    recipe_defaults: Mapping[str, object] = field(default_factory=dict)


def _apply(g: Group, c: Context, delta: Tensor) -> Tensor:
    return g.base + c.config.alpha * delta  # θ_0 + α · τ_merged, as merge_ops.apply_delta


def _generalized(g: Group, c: Context, deltas: Tensor, *, consensus: bool) -> Tensor:
    """mergekit's generalized task arithmetic over already-sparsified task vectors ``(T, n)``."""
    weighted = deltas * column(c.weights, deltas)
    return _apply(g, c, weighted_sum(weighted, c.weights, consensus=consensus, normalize=c.config.normalized))


def _per_model(g: Group, c: Context, sparsify_one: Callable[[Tensor, int], Tensor]) -> Tensor:
    return torch.stack([sparsify_one(g.deltas[t], t) for t in range(g.deltas.shape[0])])


def _ties_reference(g: Group, c: Context, *, reduce: str) -> Tensor:
    """The reference code's TIES vector of one key (global thresholds and sign if given, else per tensor)."""
    deltas = g.deltas
    thresholds = c.thresholds if c.thresholds is not None else merge_ops.trim_thresholds(deltas, c.config.density)
    return merge_ops.ties_tensor(deltas, thresholds=thresholds, majority=c.majority, reduce=reduce)


def task_arithmetic(g: Group, c: Context) -> Tensor:
    """``θ_0 + α Σ_t w_t τ_t`` (divided by ``Σ w_t`` with ``normalize``): Ilharco et al.; task negation with w < 0."""
    return _generalized(g, c, g.deltas, consensus=False)


def ties(g: Group, c: Context) -> Tensor:
    """TIES: trim each τ_t to its top ρ, elect a sign per weight, mean of the agreeing entries (Yadav et al.)."""
    if c.config.convention == "reference":
        return _apply(g, c, _ties_reference(g, c, reduce="mean"))
    trim = _per_model(g, c, lambda d, t: d * sparsify.magnitude_mask(d, c.densities[t]))
    return _generalized(g, c, trim, consensus=True)


def _dare(g: Group, c: Context) -> Tensor:
    def drop(d: Tensor, t: int) -> Tensor:
        gen = torch.Generator().manual_seed(derive_seed(c.config.seed, "dare", t, g.key))
        keep = sparsify.random_mask(d.shape, c.densities[t], gen)
        return sparsify.drop_and_rescale(d, keep, c.densities[t], rescale=c.config.rescale)

    return _per_model(g, c, drop)


def dare_ta(g: Group, c: Context) -> Tensor:
    """DARE on task arithmetic: drop each τ_t entry with probability 1 − ρ (seeded), rescale by 1/ρ, sum."""
    return _generalized(g, c, _dare(g, c), consensus=False)


def dare_ties(g: Group, c: Context) -> Tensor:
    """DARE, then TIES sign consensus and the weighted sum of the agreeing entries."""
    return _generalized(g, c, _dare(g, c), consensus=True)


def _breadcrumbs(g: Group, c: Context) -> Tensor:
    return _per_model(g, c, lambda d, t: d * sparsify.outlier_mask(d, c.densities[t], c.config.gamma))


def breadcrumbs(g: Group, c: Context) -> Tensor:
    """Model Breadcrumbs: drop each τ_t's largest γ and smallest entries (keep ρ of them), sum."""
    return _generalized(g, c, _breadcrumbs(g, c), consensus=False)


def breadcrumbs_ties(g: Group, c: Context) -> Tensor:
    """Model Breadcrumbs with TIES sign consensus."""
    return _generalized(g, c, _breadcrumbs(g, c), consensus=True)


def linear(g: Group, c: Context) -> Tensor:
    """The weighted average ``Σ w_i θ_i / Σ w_i`` of the models (a model soup); the base gives the layout."""
    return interpolate.linear(g.models, c.weights, normalize=c.config.normalized)


def slerp(g: Group, c: Context) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the one fine-tuned model (t = 1), tensor by tensor."""
    return interpolate.slerp(c.config.t, g.base, g.models[0])


def _consensus(g: Group, c: Context, merged: Tensor) -> Tensor:
    deltas = g.deltas
    masks = deltas.abs() > c.lambdas * (merged - deltas).abs()  # (T, n): the TALL masks
    return _apply(g, c, merged * merge_ops.consensus(masks, c.config.k))


def consensus_ta(g: Group, c: Context) -> Tensor:
    """Consensus Merging on task arithmetic: keep the weights that ≥ k tasks' TALL masks use."""
    return _consensus(g, c, g.deltas.sum(dim=0))


def consensus_ties(g: Group, c: Context) -> Tensor:
    """Consensus Merging on the TIES disjoint sum (the reference code's TIES inside TALL / Consensus)."""
    return _consensus(g, c, _ties_reference(g, c, reduce="sum"))


_WEIGHTED = frozenset({"alpha", "weights", "normalize"})
_SPARSE = _WEIGHTED | {"density"}
TABLE: tuple[MergeMethod, ...] = (
    MergeMethod("task-arithmetic", "θ_0 + α Σ w_t τ_t", task_arithmetic, _WEIGHTED, "task_arithmetic",
                kernel=True, store=True, recipe_defaults={"normalize": False}),
    MergeMethod("linear", "Σ w_i θ_i / Σ w_i (weight averaging, a model soup)", linear,
                frozenset({"weights", "normalize"}), "linear", strength=None, recipe_defaults={"normalize": True}),
    MergeMethod("ties", "trim to top ρ, elect signs, disjoint mean", ties,
                _SPARSE | {"scope", "convention"}, "ties", kernel=True, store=True,
                recipe_defaults={"normalize": True, "density": 1.0, "convention": "mergekit", "scope": "tensor"}),
    MergeMethod("dare-ta", "drop 1 − ρ at random (seeded), rescale by 1/ρ, sum", dare_ta,
                _SPARSE | {"seed", "rescale"}, "dare_linear", recipe_defaults={"normalize": False, "density": 1.0}),
    MergeMethod("dare-ties", "DARE, then TIES sign consensus", dare_ties, _SPARSE | {"seed", "rescale"},
                "dare_ties", recipe_defaults={"normalize": False, "density": 1.0}),
    MergeMethod("breadcrumbs", "drop the largest γ and the smallest, keep ρ, sum", breadcrumbs,
                _SPARSE | {"gamma"}, "breadcrumbs", recipe_defaults={"normalize": False, "density": 1.0}),
    MergeMethod("breadcrumbs-ties", "Model Breadcrumbs with TIES sign consensus", breadcrumbs_ties,
                _SPARSE | {"gamma"}, "breadcrumbs_ties", recipe_defaults={"normalize": False, "density": 1.0}),
    MergeMethod("slerp", "spherical interpolation from the base to one model", slerp, frozenset({"t"}), "slerp",
                models=(1, 1), strength="t"),
    MergeMethod("consensus-ta", "TALL masks on Σ τ_t, keep weights used by ≥ k tasks", consensus_ta,
                frozenset({"alpha", "k", "lam"}), kernel=True),
    MergeMethod("consensus-ties", "TALL masks on the TIES disjoint sum, keep weights used by ≥ k tasks",
                consensus_ties, frozenset({"alpha", "k", "lam", "density", "scope"}), kernel=True),
)
NAMES = tuple(m.name for m in TABLE)
MERGEKIT_NAMES = {m.mergekit: m.name for m in TABLE if m.mergekit}
for _method in TABLE:
    register(KIND, _method.name)(_method)


def get(name: str) -> MergeMethod:
    """The method called ``name`` (a weightlab name; the error lists the closest ones)."""
    found = next((m for m in TABLE if m.name == name), None)
    return found if found is not None else registry_get(KIND, name)


def readers(option: str) -> list[str]:
    """The methods that read ``option``."""
    return [m.name for m in TABLE if option in m.reads]
