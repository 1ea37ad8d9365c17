"""Sparse AdamW for LIFT (``lift``): Adam moments only for the ``k`` masked entries of each matrix.

Per sparse matrix the optimizer keeps ``indices`` ``(k,)`` (int32 while ``m·n < 2³¹``), ``exp_avg`` and
``exp_avg_sq`` ``(k,)`` and a step counter — O(k) instead of AdamW's O(m·n). A post-accumulate-grad hook on
each sparse weight gathers ``grad[indices]`` into a ``(k,)`` buffer as soon as autograd has written the dense
gradient and then frees the dense gradient, so at most one layer's dense gradient is alive at a time.
Gradient accumulation over several backward passes adds into the ``(k,)`` buffer.

Every ``refresh_every`` optimizer steps the masks are selected again from the current weights; entries that
stay in the mask keep their moments, new entries start from zero and the step counter (bias correction) goes
on (as the official code does). Decoupled weight decay multiplies the masked entries by ``1 − lr·wd`` in
place (the official code writes it to a boolean-indexed copy, where it has no effect).

Parameters in groups with ``sparse=False`` (e.g. a new classifier head) get plain dense AdamW.

Under ``torch.distributed`` (DDP, torchrun, accelerate) the gathered ``(k,)`` gradients are rank-local: DDP
never sees them (:func:`~weightlab.methods.lift.model.prepare` tells DDP to ignore the target weights), so
:meth:`SparseAdamW.synchronize` averages them over the process group, in one all-reduce per dtype, before
clipping and before the update, as DDP averages dense gradients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.lift.sampled import MaskPattern
from weightlab.weights.lowrank import carry_over

UNSTEPPED_WARNING = 1000
"""Warn when this many gradients of one weight were gathered without an optimizer step (a forgotten optimizer)."""

Selector = Callable[[Tensor, Tensor | None], Tensor]
"""``selector(weight, grad_or_None) -> sorted flat indices (k,)``; ``grad`` is given to gradient masks."""


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adam moments are kept in float32 for half-precision weights, else in the weight's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the masked entries of each sparse weight; plain AdamW over dense groups.

    Args:
        params: parameter groups; a group with ``"sparse": True`` needs ``"selectors"``: one
            :data:`Selector` per parameter, in order. Groups default to ``sparse=False``.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (LIFT's defaults: 2e-4, (0.9, 0.95), 1e-6, 0).
        refresh_every: re-select every sparse mask after this many steps (0: never).
        needs_grad: the selectors rank gradients, so masks are (re)selected in the hook from the next dense
            gradient rather than from the weights.
        max_grad_norm: clip the global norm of the (gathered) gradients before the update.
        on_refresh: called as ``on_refresh(p, old_indices, new_indices)`` on every mask selection.
        sync_grads: average the gathered sparse gradients over the ``torch.distributed`` process group when
            one is initialised with more than one rank (``False``: ranks train independently).
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-6, weight_decay: float = 0.0,
                 refresh_every: int = 0, needs_grad: bool = False, max_grad_norm: float | None = None,
                 on_refresh: Callable[[nn.Parameter, Tensor, Tensor], None] | None = None,
                 sync_grads: bool = True) -> None:
        if not lr > 0:
            raise WeightlabError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise WeightlabError(f"betas must be in [0, 1), got {betas}")
        if refresh_every < 0:
            raise WeightlabError(f"refresh_every must be ≥ 0 (0 = never), got {refresh_every}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "sparse": False}
        super().__init__(list(params), defaults)
        self.refresh_every = refresh_every
        self.needs_grad = needs_grad
        self.max_grad_norm = max_grad_norm
        self.sync_grads = sync_grads
        self._synced = False  # the gathered gradients are averaged over the ranks already
        self.steps = 0
        # called as fn(p, old_indices, new_indices) on every selection, the first one included
        self.on_refresh: list[Callable[[nn.Parameter, Tensor, Tensor], None]] = [on_refresh] if on_refresh \
            else []
        self._selectors: dict[nn.Parameter, Selector] = {}
        self._grads: dict[nn.Parameter, Tensor] = {}  # gathered (k,) gradients
        self._patterns: dict[nn.Parameter, MaskPattern] = {}  # the current mask's CSR pattern and (k,) buffer
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # column indices, shared by weights
        self._pending: set[nn.Parameter] = set()  # masks to select from the next gradient
        self._unstepped: dict[nn.Parameter, int] = {}  # gradients gathered since the last step
        self._hooks: list[Any] = []
        for group in self.param_groups:
            if not group["sparse"]:
                continue
            selectors = group.pop("selectors", None)
            if selectors is None or len(selectors) != len(group["params"]):
                raise WeightlabError("a sparse parameter group needs one selector per parameter")
            for p, select in zip(group["params"], selectors, strict=True):
                if p.dim() != 2:
                    raise WeightlabError(f"sparse parameters must be 2-D matrices, got {tuple(p.shape)}")
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                self._selectors[p] = select
                self._init_state(p)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._gather))

    # ------------------------------------------------------------------ masks
    def _init_state(self, p: nn.Parameter) -> None:
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=torch.float32)
        if self.needs_grad:
            st["indices"] = torch.zeros(0, dtype=index_dtype(p.numel()), device=p.device)
            st["exp_avg"] = torch.zeros(0, dtype=moment_dtype(p.dtype), device=p.device)
            st["exp_avg_sq"] = torch.zeros(0, dtype=moment_dtype(p.dtype), device=p.device)
            self._pending.add(p)
            return
        idx = self._selectors[p](p.detach(), None).to(index_dtype(p.numel()))
        self._notify(p, st.get("indices"), idx)
        st["indices"] = idx
        st["exp_avg"] = torch.zeros(idx.numel(), dtype=moment_dtype(p.dtype), device=p.device)
        st["exp_avg_sq"] = torch.zeros(idx.numel(), dtype=moment_dtype(p.dtype), device=p.device)

    def _notify(self, p: nn.Parameter, old: Tensor | None, new: Tensor) -> None:
        for fn in self.on_refresh:
            fn(p, torch.zeros(0, dtype=new.dtype) if old is None else old, new)

    def _reselect(self, p: nn.Parameter, grad: Tensor | None) -> None:
        st = self.state[p]
        old = st["indices"]
        new = self._selectors[p](p.detach(), grad).to(index_dtype(p.numel())).to(p.device)
        self._notify(p, old, new)
        st["exp_avg"] = carry_over(old, new, st["exp_avg"])
        st["exp_avg_sq"] = carry_over(old, new, st["exp_avg_sq"])
        st["indices"] = new
        self._patterns.pop(p, None)  # (the cache would keep the old indices alive)

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Select every sparse mask again and carry the moments of entries that stay (done every
        ``refresh_every`` steps by :meth:`step`; gradient masks are re-selected from the next gradient)."""
        for p in self._selectors:
            if self.needs_grad:
                self._pending.add(p)
            else:
                self._reselect(p, None)

    @torch.no_grad()
    def accumulate_masked(self, p: nn.Parameter, x: Tensor, grad_out: Tensor, *,
                          chunk_elements: int | None = None) -> None:
        """Add the masked gradient of ``y = x Wᵀ`` to ``p``'s ``(k,)`` buffer without forming the dense one:
        ``g[i] = Σ_t grad_out[t, row_i] · x[t, col_i]`` (:func:`~weightlab.methods.lift.sampled.masked_weight_grad`:
        a sampled matmul, or row blocks of about ``chunk_elements`` dense entries at high mask densities; used
        by :func:`masked_grad_linear`)."""
        if p in self._pending:
            raise WeightlabError("gradient masks need the dense gradient; use sparse_grad=False")
        pattern = self._pattern(p)
        idx = pattern.indices
        key = (idx.dtype, idx.device)
        if self._scratch.get(key, idx[:0]).numel() < idx.numel():
            self._scratch[key] = torch.empty_like(idx)
        kw = {"chunk_elements": chunk_elements, "scratch": self._scratch[key]}
        g_out, inp = grad_out.reshape(-1, p.shape[0]), x.reshape(-1, p.shape[1])
        held = self._grads.get(p)
        if held is pattern.values:  # a second backward pass before the step: add in place
            pattern.grad(g_out, inp, accumulate=True, **kw)
        elif held is not None:
            held.add_(pattern.grad(g_out, inp, **kw))
        else:
            self._grads[p] = pattern.grad(g_out, inp, **kw)  # (k,), no allocation
        self._count_unstepped(p)

    def _pattern(self, p: nn.Parameter) -> MaskPattern:
        """The :class:`MaskPattern` of ``p``'s current mask (built again after a refresh)."""
        idx = self.state[p]["indices"]
        pattern = self._patterns.get(p)
        if pattern is None or pattern.indices is not idx:
            pattern = self._patterns[p] = MaskPattern.of(idx, tuple(p.shape), dtype=self.state[p]["exp_avg"].dtype)
        return pattern

    @torch.no_grad()
    def _gather(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: keep ``grad[indices]`` ``(k,)`` and free the dense gradient."""
        if p.grad is None:
            return
        if p in self._pending:
            self._reselect(p, p.grad)
            self._pending.discard(p)
        st = self.state[p]
        if st["indices"].device != p.device:
            for key in ("indices", "exp_avg", "exp_avg_sq"):
                st[key] = st[key].to(p.device)
        flat = p.grad.reshape(-1)
        if p in self._grads:
            self._grads[p].add_(flat.index_select(0, st["indices"]).to(st["exp_avg"].dtype))
        elif flat.dtype == st["exp_avg"].dtype:  # into the mask's reused (k,) buffer
            self._grads[p] = torch.index_select(flat, 0, st["indices"], out=self._pattern(p).values)
        else:
            self._grads[p] = flat.index_select(0, st["indices"]).to(st["exp_avg"].dtype)  # (k,)
        p.grad = None
        self._count_unstepped(p)

    def _count_unstepped(self, p: nn.Parameter) -> None:
        self._synced = False
        count = self._unstepped[p] = self._unstepped.get(p, 0) + 1
        if count == UNSTEPPED_WARNING:
            warnings.warn(f"LIFT's SparseAdamW has gathered {count} gradients of a weight without a step: is it "
                          "the optimizer being stepped? With the transformers Trainer pass "
                          "**lift.trainer_kwargs() (optimizers=(lift.optimizer, None))", stacklevel=3)

    @property
    def unstepped_backward_passes(self) -> int:
        """Backward passes whose sparse gradients were gathered since the last :meth:`step` (0 after a step)."""
        return max(self._unstepped.values(), default=0)

    # ------------------------------------------------------------------ optimizer protocol
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grads.clear()
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus the step counter that schedules mask refreshes."""
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`torch.optim.Optimizer.load_state_dict`, but integer ``indices`` and float32 moments are
        not cast to a half-precision parameter's dtype (which would corrupt them; accelerate and the
        transformers Trainer round-trip the state), and the refresh schedule's step counter is restored."""
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("steps", 0))
        self._patterns.clear()
        keys = ("indices", "exp_avg", "exp_avg_sq")
        state = {pid: dict(s) for pid, s in state_dict["state"].items()}
        kept = {pid: {k: s.pop(k) for k in keys if k in s} for pid, s in state.items()}
        super().load_state_dict({**state_dict, "state": state})
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, tensors in kept.items():
            p = params[pid]
            for key, value in tensors.items():
                dtype = index_dtype(p.numel()) if key == "indices" else moment_dtype(p.dtype)
                self.state[p][key] = value.to(device=p.device, dtype=dtype)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _gradients(self) -> list[Tensor]:
        """The gathered ``(k,)`` gradients of the sparse weights and the dense gradients of the other groups."""
        dense = [p.grad for g in self.param_groups if not g["sparse"] for p in g["params"] if p.grad is not None]
        return [*self._grads.values(), *dense]

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average every sparse weight's gathered ``(k,)`` gradient over the ranks (a no-op for one process,
        with ``sync_grads=False``, or when already done since the last gather). A weight no rank gathered a
        gradient for stays without one; one only some ranks did gets the others' zeros, as in DDP. Every rank
        must call it (:meth:`step` and :meth:`clip_grad_norm_` do)."""
        if self._synced or not self.sync_grads or not dist.is_available() or not dist.is_initialized():
            return
        world = dist.get_world_size()
        if world == 1:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self._selectors:  # the same order on every rank
            by_dtype.setdefault(self.state[p]["exp_avg"].dtype, []).append(p)
        for dtype in sorted(by_dtype, key=str):
            params = by_dtype[dtype]
            parts = [self._grads[p] if p in self._grads else
                     torch.zeros(self.state[p]["indices"].numel(), dtype=dtype, device=p.device) for p in params]
            present = torch.tensor([float(p in self._grads) for p in params], dtype=dtype, device=parts[0].device)
            flat = torch.cat([*parts, present])  # (Σk + P,)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            for p, g, gathered in zip(params, flat[:-len(params)].split([t.numel() for t in parts]),
                                      flat[-len(params):].tolist(), strict=True):
                if gathered > 0:
                    self._grads[p] = g
        self._synced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale every gradient this optimizer will apply (the gathered sparse ones, which an outer
        ``torch.nn.utils.clip_grad_norm_(model.parameters())`` never sees, and the dense ones) so their global
        ℓ2 norm is at most ``max_norm``, as ``clip_grad_norm_`` does; returns the norm before clipping (of the
        gradients averaged over the ranks under ``torch.distributed``)."""
        self.synchronize()
        grads = self._gradients()
        if not grads:
            return torch.zeros(())
        device = grads[0].device
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()).to(device) for g in grads]))
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.to(g.device, g.dtype))
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.synchronize()
        if self.max_grad_norm is not None:
            self.clip_grad_norm_(self.max_grad_norm)
        self._unstepped.clear()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if group["sparse"]:
                    grad = self._grads.pop(p, None)
                elif p.grad is not None:
                    grad = p.grad.to(moment_dtype(p.dtype))
                    self._dense_state(p)
                else:
                    grad = None
                if grad is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                t = float(st["step"])
                exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # the gradient is used up: its buffer takes the denominator (no allocation)
                denom = torch.sqrt(exp_avg_sq, out=grad) if group["sparse"] else exp_avg_sq.sqrt()
                denom.div_(math.sqrt(1 - beta2**t)).add_(eps)
                step_size = lr / (1 - beta1**t)
                if group["sparse"]:
                    flat = p.view(-1)
                    idx = st["indices"]
                    delta = torch.div(exp_avg, denom, out=denom).mul_(-step_size)  # (k,)
                    if wd:  # the weights are read only when they decay
                        delta.sub_(flat.index_select(0, idx).to(exp_avg.dtype).mul_(lr * wd))
                    flat.index_add_(0, idx, delta.to(p.dtype))
                else:
                    p.mul_(1 - lr * wd)
                    p.add_((exp_avg / denom * -step_size).to(p.dtype))
        self.steps += 1
        self._synced = False
        if self.refresh_every and self.steps % self.refresh_every == 0:
            self.refresh_masks()
        return loss

    def _dense_state(self, p: nn.Parameter) -> None:
        st = self.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype(p.dtype))
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype(p.dtype))

    # ------------------------------------------------------------------ accounting
    def state_numel(self) -> dict[str, int]:
        """Counts of stored numbers: ``indices`` and ``moments`` (both Adam moments, sparse and dense)."""
        out = {"indices": 0, "moments": 0}
        for st in self.state.values():
            if "indices" in st:
                out["indices"] += st["indices"].numel()
            out["moments"] += sum(st[k].numel() for k in ("exp_avg", "exp_avg_sq") if k in st)
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state (indices, moments, step counters) plus the gathered gradient buffers."""
        total = sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                    if isinstance(t, Tensor))
        return total + sum(g.numel() * g.element_size() for g in self._grads.values())

    def index_buffer_bytes(self) -> int:
        """Bytes of the ``sparse_grad`` path's index buffers: each mask's CSR row pointers and the column-index
        scratch its weights share. (Each weight's ``(k,)`` gradient buffer also stays allocated between steps,
        to be reused; it is the gradient :meth:`state_bytes` counts while one is gathered.)"""
        crow = sum(pt.crow.numel() * pt.crow.element_size() for pt in self._patterns.values())
        return crow + sum(t.numel() * t.element_size() for t in self._scratch.values())

    def is_sparse(self, p: Tensor) -> bool:
        """Whether ``p`` is one of this optimizer's sparse (masked) weights."""
        return p in self._selectors

    def masks(self) -> dict[nn.Parameter, Tensor]:
        """The current sorted flat indices of every sparse parameter."""
        return {p: self.state[p]["indices"] for p in self._selectors}
