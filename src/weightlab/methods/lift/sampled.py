"""The masked entries of a linear layer's weight gradient without the dense gradient (paper key ``lift``).

For ``y = x Wᵀ`` with ``W`` of shape ``(m, n)``, ``∂L/∂W = grad_outᵀ x`` ``(m, n)``; LIFT needs only its ``k``
entries at the mask's sorted flat indices. :func:`masked_weight_grad` computes them directly:

* at mask densities up to :data:`SAMPLED_MAX_DENSITY` as a sampled matmul
  (:func:`torch.sparse.sampled_addmm` on the mask's CSR pattern): ``k·T`` products instead of ``m·n·T``;
* above it, row block by row block of the dense product (BLAS is then cheaper per useful entry), gathering
  the mask's entries of each block, so at most ``max(k, 2²⁰)`` dense entries exist at a time.

Both equal ``(grad_outᵀ x).view(-1)[indices]`` up to float rounding (a different summation order over the
``T`` rows; tested to ``rtol = 1e-5`` in float32). :func:`masked_grad_linear` makes an ``nn.Linear`` use it
(``LiftConfig(sparse_grad=True)``).
"""

from __future__ import annotations

import types
import warnings
import weakref
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


def column_indices(indices: Tensor, crow: Tensor, n: int) -> Tensor:
    """Columns ``(k,)`` of sorted flat ``indices``: a bit mask when ``n`` is a power of two, else the index
    minus its row's start (cheaper than an integer remainder)."""
    if n & (n - 1) == 0:
        return indices.bitwise_and(n - 1)
    starts = torch.arange(crow.numel() - 1, dtype=indices.dtype, device=indices.device) * n  # (m,)
    return indices - torch.repeat_interleave(starts, crow.diff(), output_size=indices.numel())


def masked_weight_grad(grad_out: Tensor, x: Tensor, indices: Tensor, shape: tuple[int, int], *,
                       dtype: torch.dtype, chunk_elements: int | None = None,
                       crow: Tensor | None = None) -> Tensor:
    """``(grad_outᵀ x).view(-1)[indices]`` without forming the ``(m, n)`` product.

    Args:
        grad_out: ``(T, m)`` gradient of the layer's output (leading dimensions already flattened).
        x: ``(T, n)`` the layer's input.
        indices: ``(k,)`` sorted flat indices into the ``(m, n)`` weight (int32 or int64).
        shape: ``(m, n)``.
        dtype: dtype of the result (float32 for half-precision layers).
        chunk_elements: dense entries per row block on the blocked path (default ``max(k, 2²⁰)``).
        crow: :func:`row_pointers` of ``indices`` if the caller keeps them (computed otherwise).

    Returns:
        ``(k,)`` gradient entries in ``dtype``.
    """
    m, n = shape
    k = indices.numel()
    if k == 0:
        return torch.zeros(0, dtype=dtype, device=grad_out.device)
    crow = row_pointers(indices, shape) if crow is None else crow  # (m + 1,)
    if k > SAMPLED_MAX_DENSITY * m * n:
        return _blocked(grad_out, x, indices, crow, shape, dtype=dtype, chunk=chunk_elements or max(k, 1 << 20))
    compute = dtype if dtype in SAMPLED_DTYPES else torch.float32
    cols = column_indices(indices, crow, n)  # (k,)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(k, dtype=compute, device=grad_out.device),
                                          (m, n), check_invariants=False)
        sampled = torch.sparse.sampled_addmm(pattern, grad_out.to(compute).T, x.to(compute), beta=0.0)
    return sampled.values().to(dtype)  # (k,)


def _blocked(grad_out: Tensor, x: Tensor, indices: Tensor, crow: Tensor, shape: tuple[int, int], *,
             dtype: torch.dtype, chunk: int) -> Tensor:
    """Row blocks of ``grad_outᵀ x`` ``(b, n)``, each gathered at its mask entries."""
    m, n = shape
    out = torch.empty(indices.numel(), dtype=dtype, device=grad_out.device)  # (k,)
    bounds = crow.tolist()
    common = torch.promote_types(grad_out.dtype, x.dtype)
    step = max(1, chunk // n)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        s, e = bounds[r0], bounds[r1]
        if s == e:
            continue
        block = grad_out[:, r0:r1].T.to(common) @ x.to(common)  # (b, n)
        out[s:e] = block.reshape(-1).index_select(0, indices[s:e] - r0 * n).to(dtype)
    return out


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
