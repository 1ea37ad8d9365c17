"""The masked entries of a linear layer's weight gradient without the dense gradient (paper key ``lift``).

For ``y = x Wᵀ`` with ``W`` of shape ``(m, n)``, ``∂L/∂W = grad_outᵀ x`` ``(m, n)``; LIFT needs only its ``k``
entries at the mask's sorted flat indices. :func:`masked_weight_grad` computes them directly:

* at mask densities up to :data:`SAMPLED_MAX_DENSITY` as a sampled matmul
  (:func:`torch.sparse.sampled_addmm` on the mask's CSR pattern): ``k·T`` products instead of ``m·n·T``;
* above it, row block by row block of the dense product (BLAS is then cheaper per useful entry), gathering
  the mask's entries of each block, so at most ``max(k, 2²⁰)`` dense entries exist at a time.

:class:`MaskPattern` keeps a mask's CSR pattern and its ``(k,)`` output buffer between backward passes. Both
paths equal ``(grad_outᵀ x).view(-1)[indices]`` up to float rounding (a different summation order over the
``T`` rows; tested to ``rtol = 1e-5`` in float32). :func:`masked_grad_linear` makes an ``nn.Linear`` use it
(``LiftConfig(sparse_grad=True)``).
"""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from weightlab.methods.lift.optimizer import SparseAdamW

SAMPLED_MAX_DENSITY = 0.125
"""Above this fraction of entries the row-blocked dense product is cheaper than the sampled matmul (on a CPU
core the sampled kernel does ~5 GFLOP/s against BLAS's ~40; LIFT's usual budgets are 1–10%)."""

SAMPLED_DTYPES = (torch.float32, torch.float64)
"""Dtypes :func:`torch.sparse.sampled_addmm` supports on every device; half precision is computed in float32."""


def row_pointers(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR row pointers ``(m + 1,)`` of sorted flat ``indices`` into a matrix of ``shape`` (in their dtype)."""
    m, n = shape
    bounds = torch.arange(0, m * n + 1, n, dtype=indices.dtype, device=indices.device)  # (m + 1,)
    return torch.searchsorted(indices, bounds).to(indices.dtype)


def column_indices(indices: Tensor, crow: Tensor, n: int, *, out: Tensor | None = None) -> Tensor:
    """Columns ``(k,)`` of sorted flat ``indices``: a bit mask when ``n`` is a power of two, else the index
    minus its row's start (cheaper than an integer remainder); written into ``out[:k]`` when given."""
    dest = None if out is None else out[: indices.numel()]
    if n & (n - 1) == 0:
        return torch.bitwise_and(indices, n - 1, out=dest) if dest is not None else indices.bitwise_and(n - 1)
    starts = torch.arange(crow.numel() - 1, dtype=indices.dtype, device=indices.device) * n  # (m,)
    row_starts = torch.repeat_interleave(starts, crow.diff(), output_size=indices.numel())
    return torch.sub(indices, row_starts, out=dest) if dest is not None else indices - row_starts


@dataclass(eq=False)
class MaskPattern:
    """One mask's CSR row pointers and the ``(k,)`` buffer its gradient is written into, built once per mask
    and reused by every backward pass (the optimizer keeps one per weight): the gradient buffer is the one
    the optimizer steps with, so no ``k``-sized buffer is allocated per step (on a CPU a fresh one costs page
    faults). The column indices (``k`` ints) are derived per pass, into a scratch buffer the caller may share
    between its weights, so the memory held between steps stays the gradient's.

    Attributes:
        indices: ``(k,)`` sorted flat indices into the ``(m, n)`` weight.
        shape: ``(m, n)``.
        crow: :func:`row_pointers` of ``indices``.
        values: ``(k,)`` the gradient buffer, in the compute dtype (float32 for half precision).
        sampled: the density is low enough for the sampled matmul (else row blocks of the dense product).
    """

    indices: Tensor
    shape: tuple[int, int]
    crow: Tensor
    values: Tensor
    sampled: bool

    @classmethod
    def of(cls, indices: Tensor, shape: tuple[int, int], *, dtype: torch.dtype) -> MaskPattern:
        m, n = shape
        k = indices.numel()
        crow = row_pointers(indices, shape)  # (m + 1,)
        compute = dtype if dtype in SAMPLED_DTYPES else torch.float32
        values = torch.zeros(k, dtype=compute, device=indices.device)  # (k,)
        return cls(indices, (m, n), crow, values, sampled=k <= SAMPLED_MAX_DENSITY * m * n)

    def grad(self, grad_out: Tensor, x: Tensor, *, accumulate: bool = False, chunk_elements: int | None = None,
             scratch: Tensor | None = None) -> Tensor:
        """Write ``(grad_outᵀ x).view(-1)[indices]`` into :attr:`values` (add it when ``accumulate``) and
        return :attr:`values`; ``grad_out`` is ``(T, m)``, ``x`` is ``(T, n)``; ``scratch`` (at least ``k``
        ints of the indices' dtype) takes the column indices."""
        k = self.indices.numel()
        if k == 0:
            return self.values
        if not accumulate:
            self.values.zero_()  # (sampled_addmm scales the old values by beta, so a NaN would stay)
        if not self.sampled:
            _blocked(grad_out, x, self.indices, self.crow, self.shape, out=self.values,
                     chunk=chunk_elements or max(k, 1 << 20))
            return self.values
        compute = self.values.dtype
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            cols = column_indices(self.indices, self.crow, self.shape[1], out=scratch)
            csr = torch.sparse_csr_tensor(self.crow, cols, self.values, self.shape,
                                          check_invariants=False)  # over the buffer
            torch.sparse.sampled_addmm(csr, grad_out.to(compute).T, x.to(compute), out=csr)
        return self.values


def masked_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int], *,
                       dtype: torch.dtype, chunk_elements: int | None = None) -> Tensor:
    """``(grad_outᵀ x).view(-1)[indices]`` without forming the ``(m, n)`` product.

    Args:
        grad_out: ``(T, m)`` gradient of the layer's output (leading dimensions already flattened).
        x: ``(T, n)`` the layer's input.
        indices: ``(k,)`` sorted flat indices into the ``(m, n)`` weight (int32 or int64).
        shape: ``(m, n)``.
        dtype: dtype of the result (float32 for half-precision layers).
        chunk_elements: dense entries per row block on the blocked path (default ``max(k, 2²⁰)``).

    Returns:
        ``(k,)`` gradient entries in ``dtype`` (a fresh tensor; :class:`MaskPattern` reuses one).
    """
    return MaskPattern.of(indices, shape, dtype=dtype).grad(grad_out, x, chunk_elements=chunk_elements).to(dtype)


def _blocked(grad_out: Tensor, x: Tensor, indices: Tensor, crow: Tensor, shape: tuple[int, int], *,
             out: Tensor, chunk: int) -> None:
    """Add row blocks of ``grad_outᵀ x`` ``(b, n)``, each gathered at its mask entries, into ``out`` ``(k,)``."""
    m, n = shape
    bounds = crow.tolist()
    common = torch.promote_types(grad_out.dtype, x.dtype)
    step = max(1, chunk // n)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        s, e = bounds[r0], bounds[r1]
        if s == e:
            continue
        block = grad_out[:, r0:r1].T.to(common) @ x.to(common)  # (b, n)
        out[s:e] += block.reshape(-1).index_select(0, indices[s:e] - r0 * n).to(out.dtype)


class _MaskedGradLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient goes straight into the optimizer's ``(k,)`` buffer."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, opt: SparseAdamW) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.opt, ctx.has_bias = opt, bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None  # autocast-safe
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        ctx.opt.accumulate_masked(weight, x, grad_out)
        return grad_x, None, grad_b, None


def _masked_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """The forward :func:`masked_grad_linear` binds to a module. A copy of the module (``copy.deepcopy``) keeps
    it, but its new weight is not the optimizer's, so the copy is a plain ``nn.Linear``."""
    opt = self._lift_optimizer()
    if opt is None or not opt.is_sparse(self.weight):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _MaskedGradLinear.apply(x, self.weight, self.bias, opt)


def masked_grad_linear(module: nn.Linear, opt: SparseAdamW) -> None:
    """Make ``module`` compute only the masked entries of its weight gradient (no dense ``(m, n)`` buffer);
    undo with :func:`unmask_grad_linear`."""
    module._lift_optimizer = weakref.ref(opt)  # type: ignore[assignment]
    module.forward = types.MethodType(_masked_forward, module)  # type: ignore[method-assign]


def unmask_grad_linear(module: nn.Linear) -> None:
    """Undo :func:`masked_grad_linear` (a no-op on a module it was not applied to)."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_lift_optimizer", None)
