"""Pure tensor operations behind model merging: task vectors, TIES trimming / sign election / disjoint merge,
TALL masks, consensus counts and 1-bit mask packing (paper key ``tall-masks``).

Every function takes single tensors, or a stack ``(T, ...)`` of the T task tensors of one key, and returns new
tensors (inputs are never modified). That is what lets :mod:`weightlab.methods.merging` run a merge one
tensor at a time over checkpoints that do not fit in memory. Quantities that span the whole model (the
global TIES threshold of each task, the majority sign) are passed in explicitly.

Conventions follow the reference code (``nik-dim/tall_masks``, see ``spec/merging.md`` §1):

* trimming keeps ``|τ| ≥ t`` where ``t`` is the ``(d − ⌊d·density⌋)``-th smallest magnitude of the ``d``
  entries in scope (so ``⌊d·density⌋ + 1`` entries survive when there are no ties); ``density = 1`` keeps all;
* the elected sign is ``sign(Σ_t τ̂_t)``; entries where it is 0 take the majority sign ``sign(Σ γ)``;
* the TALL mask uses a strict ``>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

HIST_BINS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit 0)
HIST_CHUNK = 1 << 18  # entries per piece of a radix histogram (two 1 MB int32 scratch rows)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and float32 inputs, float64 for float64 (task vectors are never fp16)."""
    return torch.promote_types(dtype, torch.float32)


def task_vector(base: Tensor, finetuned: Tensor) -> Tensor:
    """``τ = θ_t − θ_0`` in float32 (or float64)."""
    dtype = compute_dtype(finetuned.dtype)
    return finetuned.to(dtype) - base.to(dtype)


def keep_rank(numel: int, density: float) -> int:
    """The 1-based rank (k-th smallest magnitude) of the trim threshold: ``d − ⌊d·density⌋`` (0: keep all)."""
    return numel - int(numel * density)


def trim_thresholds(stack: Tensor, density: float) -> Tensor:
    """Per-row trim thresholds ``(T,)`` of ``stack`` ``(T, ...)``: the ``keep_rank``-th smallest ``|τ|``.

    float32 rows take the exact radix select (:func:`kth_smallest_magnitude`, no copy of a row); other dtypes
    ``kthvalue``. Both return the same value (NaN sorts above ``inf``, as in ``torch.sort``).
    """
    flat = stack.reshape(stack.shape[0], -1)  # (T, d)
    rank = keep_rank(flat.shape[1], density)
    if rank <= 0:
        return torch.zeros(stack.shape[0], dtype=flat.dtype, device=flat.device)
    if flat.dtype == torch.float32:
        return kth_smallest_magnitude(flat, [rank] * flat.shape[0]).to(flat.device)
    # one row at a time: kthvalue copies its input, so this keeps the temporary at one task's size
    return torch.stack([row.abs().kthvalue(rank).values for row in flat])


def trim(stack: Tensor, thresholds: Tensor) -> Tensor:
    """``τ̂_t = τ_t · 1{|τ_t| ≥ threshold_t}`` for a stack ``(T, ...)`` and thresholds ``(T,)``."""
    shape = (-1,) + (1,) * (stack.dim() - 1)
    return stack * (stack.abs() >= thresholds.reshape(shape).to(stack.dtype))


def raw_sign(trimmed: Tensor) -> Tensor:
    """``sign(Σ_t τ̂_t)`` ``(...)`` before zero resolution."""
    return torch.sign(trimmed.sum(dim=0))


def majority_sign(raw: Tensor) -> Tensor:
    """``sign(Σ γ)`` over all entries of ``raw`` (a 0-dim tensor); sum partial results to stream."""
    return torch.sign(raw.sum())


def elect_sign(trimmed: Tensor, majority: Tensor | float | None = None) -> Tensor:
    """The elected sign ``γ`` ``(...)``: ``sign(Σ_t τ̂_t)`` with zeros set to ``majority``.

    Args:
        trimmed: ``(T, ...)`` trimmed task vectors of one key.
        majority: the majority sign over the merge's scope; default: computed over this tensor.
    """
    gamma = raw_sign(trimmed)
    if majority is None:
        majority = majority_sign(gamma)
    return torch.where(gamma == 0, torch.as_tensor(majority, dtype=gamma.dtype), gamma)


def disjoint_merge(trimmed: Tensor, sign: Tensor, reduce: str = "mean") -> Tensor:
    """Mean (``"mean"``) or sum (``"sum"``) over tasks of the entries whose sign agrees with ``sign``.

    The mean divides by the number of nonzero agreeing entries (at least 1), as the reference code does.
    """
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)  # (T, ...)
    selected = trimmed * agree
    total = selected.sum(dim=0)
    if reduce == "sum":
        return total
    return total / (selected != 0).sum(dim=0).clamp(min=1).to(total.dtype)


def ties_tensor(
    stack: Tensor, *, thresholds: Tensor, majority: Tensor | float | None = None, reduce: str = "mean"
) -> Tensor:
    """TIES on one key ``(T, ...) -> (...)``: trim with ``thresholds`` ``(T,)``, elect, disjoint mean/sum."""
    trimmed = trim(stack, thresholds)
    return disjoint_merge(trimmed, elect_sign(trimmed, majority), reduce)


def tall_mask(tau: Tensor, merged: Tensor, lam: float) -> Tensor:
    """``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict, as the reference code): a bool tensor."""
    return tau.abs() > lam * (merged - tau).abs()


def agreement(masks: Tensor) -> Tensor:
    """For a stack of bool masks ``(T, ...)``: in how many tasks each weight is active ``(...)`` (int16)."""
    return masks.sum(dim=0, dtype=torch.int16)


def consensus(masks: Tensor, k: int) -> Tensor:
    """``Σ_t m_t ≥ k`` for a stack of bool masks ``(T, ...)``."""
    return agreement(masks) >= k


def apply_delta(
    base: Tensor, vector: Tensor, alpha: float = 1.0, mask: Tensor | None = None, *, out: Tensor | None = None
) -> Tensor:
    """``θ_0 + α · (mask ∘ vector)`` computed in float32 and cast back to ``base``'s dtype.

    ``out`` (of the compute dtype and ``base``'s shape; it may be ``vector`` itself) takes the sum in place of
    a new tensor; the result is the same.
    """
    dtype = compute_dtype(base.dtype)
    delta = vector.to(dtype)
    if mask is not None:
        delta = delta * mask
    if out is None:
        return (base.to(dtype) + alpha * delta).to(base.dtype)
    return torch.mul(delta, alpha, out=out).add_(base.to(dtype)).to(base.dtype)  # + is commutative in IEEE


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as ``ceil(numel / 8)`` uint8 bytes, most significant bit first (``np.packbits``)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (bytes, 8)
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(shape))


def high_bits(magnitudes: Tensor) -> Tensor:
    """Bin index (high 16 bits) of non-negative float32 magnitudes; monotone in the value."""
    return magnitudes.to(torch.float32).contiguous().view(torch.int32) >> 16


def radix_histogram(magnitudes: Tensor, *, prefix: int | None = None) -> Tensor:
    """Histogram for an exact streamed k-th smallest (two-level radix select over float32 bit patterns).

    Without ``prefix``: counts of the high 16 bits ``(2**15,)``. With ``prefix``: counts of the low 16 bits
    ``(2**16,)`` among entries whose high bits equal ``prefix``. (One tensor; :func:`radix_counts` is the
    chunked per-row form the merges use.)
    """
    rows = magnitudes.to(torch.float32).reshape(1, -1)
    return radix_counts(rows, None if prefix is None else [prefix])[0]


def radix_counts(rows: Tensor, prefix: Sequence[int] | None = None, *, chunk: int = HIST_CHUNK) -> Tensor:
    """Per-row radix histograms of ``|rows|`` for float32 ``rows`` ``(T, n)`` (each row's last stride 1).

    Without ``prefix``: ``(T, 2**15)`` counts of the high 16 bits of ``|x|``'s bit pattern. With ``prefix``
    (one bin per row): ``(T, 2**16)`` counts of the low 16 bits among the entries of row ``t`` whose high bits
    are ``prefix[t]``. Works in ``chunk``-entry pieces through one int32 scratch buffer (no copy of a row);
    sums over the rows of several tensors add up, which is how a merge finds thresholds over a whole model.
    """
    n_rows, n = rows.shape
    bins = HIST_BINS if prefix is None else 1 << 16
    counts = torch.zeros(n_rows, bins, dtype=torch.int64, device=rows.device)
    scratch = torch.empty(2, min(chunk, max(n, 1)), dtype=torch.int32, device=rows.device)
    bits = rows.view(torch.int32)  # (T, n) float32 bit patterns
    for t in range(n_rows):
        for start in range(0, n, chunk):
            part, outside = scratch[:, : min(chunk, n - start)]
            torch.bitwise_and(bits[t, start : start + part.numel()], 0x7FFFFFFF, out=part)  # bits of |x|
            if prefix is None:
                counts[t] += torch.bincount(part.bitwise_right_shift_(16), minlength=HIST_BINS)
                continue
            # low bits of the prefix bin → 0 .. 2**16 − 1; any other entry → 2**16 + its low bits, spread over
            # 2**16 bins (not piled into one, whose counter every increment would have to wait for)
            part.sub_(prefix[t] << 16)
            torch.bitwise_right_shift(part, 16, out=outside).ne_(0).bitwise_left_shift_(16)
            part.bitwise_and_(0xFFFF).bitwise_or_(outside)
            counts[t] += torch.bincount(part, minlength=2 * bins)[:bins]
    return counts


def locate_rank(hist: Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest (1-based) entry and the rank within that bin."""
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype, device=cum.device)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, rank - before


def value_from_bits(high: int, low: int) -> float:
    """The float32 whose bit pattern is ``high << 16 | low``."""
    return torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item()


def select_from_counts(high: Tensor, ranks: Sequence[int], low_counts: Callable[[list[int]], Tensor]) -> Tensor:
    """Finish a two-level radix select: per-row high-bit counts ``(T, 2**15)`` and 1-based ``ranks`` give each
    row's bin; ``low_counts(bins)`` returns the ``(T, 2**16)`` low-bit counts within them. Returns ``(T,)``."""
    located = [locate_rank(high[t], r) for t, r in enumerate(ranks)]
    low = low_counts([b for b, _ in located])
    values = [value_from_bits(b, locate_rank(low[t], r)[0]) for t, (b, r) in enumerate(located)]
    return torch.tensor(values, dtype=torch.float32)


def kth_smallest_magnitude(rows: Tensor, ranks: Sequence[int]) -> Tensor:
    """The ``ranks[t]``-th smallest (1-based) ``|x|`` of each float32 row ``(T, n)`` → ``(T,)``, exactly.

    A two-level radix select over the bit patterns of ``|x|`` (monotone in the value for non-negative floats;
    NaN patterns lie above ``inf``, so the order is ``torch.sort``'s): two passes over the rows, no copy.
    """
    return select_from_counts(radix_counts(rows), ranks, lambda bins: radix_counts(rows, bins))


# -- fused forms for large tensors: identical results to trim / elect_sign / disjoint_merge on finite input ---


def shrink_lambdas(thresholds: Tensor) -> list[float]:
    """For each trim threshold, the largest float below it: ``|x| ≥ thr ⇔ |x| > λ`` (``hardshrink``'s test)."""
    return torch.nextafter(thresholds, torch.full_like(thresholds, -math.inf)).tolist()


def trim_into(out: Tensor, stack: Tensor, lambdas: Sequence[float]) -> Tensor:
    """``out[t] = trim(stack[t], thr_t)`` for ``(T, c)`` views, one ``hardshrink`` per row (λ from
    :func:`shrink_lambdas`). Equal to :func:`trim` wherever the input is finite (a dropped entry is +0)."""
    for t, lam in enumerate(lambdas):
        torch.ops.aten.hardshrink.out(stack[t], lam, out=out[t])
    return out


def effective_sign(total: Tensor, majority: float) -> Tensor:
    """The sign (±1) :func:`disjoint_merge` keeps for ``sign(total)`` with zeros set to ``majority``: entries
    with ``sign > 0`` keep positive task values, all others negative ones (so a zero majority acts as −1)."""
    if majority > 0:
        return torch.where(total < 0, -1.0, 1.0)
    return torch.where(total > 0, 1.0, -1.0)


def disjoint_merge_(trimmed: Tensor, sign: Tensor, reduce: str = "mean") -> Tensor:
    """:func:`disjoint_merge` for an effective sign ``(c,)`` of ±1 (:func:`effective_sign`), overwriting
    ``trimmed`` ``(T, c)``: ``sign · Σ_t relu(sign · τ̂_t)`` (and ÷ the count of agreeing entries for the mean).
    Negating is exact and the sum runs over the same entries in the same order, so the result is identical."""
    trimmed.mul_(sign).relu_()  # the agreeing entries' magnitudes
    total = trimmed.sum(dim=0).mul_(sign)  # (c,)
    if reduce == "sum":
        return total
    count = trimmed.sign_().sum(dim=0).clamp_(min=1)  # (c,) agreeing entries (exact small integers)
    return total.div_(count)
