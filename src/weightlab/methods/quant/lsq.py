"""Learned Step-size Quantization (LSQ; Esser et al. 2020), the baseline of paper key ``ofq``.

The step ``s`` is a learned parameter; its gradient is scaled by ``g = 1/√(Qp·N)`` so that it learns at a rate
comparable to the weights (``N``: the number of weights per output row, or of features per sample for
activations). Signed range ``[−2^(b−1), 2^(b−1)−1]``, unsigned ``[0, 2^b−1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError


def check_bits(bits: int, *, what: str = "bits") -> int:
    """``bits`` if it is an int in 1–8, else a :class:`WeightlabError` naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise WeightlabError(f"{what} must be an integer from 1 to 8, got {bits!r}")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x.round() + (x - x.detach())  # exact integers forward


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` forward; the gradient flowing into ``x`` is multiplied by ``scale``."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def lsq_range(bits: int, *, signed: bool) -> tuple[int, int]:
    """``(Qn, Qp)``: the integer codes run from ``−Qn`` to ``Qp``."""
    check_bits(bits)
    if signed:
        if bits < 2:
            raise WeightlabError("signed LSQ needs bits ≥ 2 (1 bit leaves the levels {−1, 0}); "
                                 f"got bits={bits}; use method='statsq' for 1-bit weights")
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_scale(qp: int, n: int) -> float:
    """LSQ's step-size gradient scale ``1/√(Qp·N)``."""
    return 1.0 / math.sqrt(qp * n)


def lsq_quantize(x: Tensor, step: Tensor, *, qn: int, qp: int, g: float) -> Tensor:
    """Fake-quantize ``x`` with the (broadcastable) ``step``: ``round_ste(clamp(x/s, −Qn, Qp))·s``.

    The gradient reaching ``step`` is scaled by ``g``; values outside the range pass no gradient to ``x``.
    One autograd node (:class:`_LsqQuantize`): the forward numbers of composing :func:`grad_scale`, ``clamp``
    and :func:`round_ste` bit for bit, their gradients up to float rounding (tested), in fewer passes.
    """
    return _LsqQuantize.apply(x, step, qn, qp, g)


class _LsqQuantize(torch.autograd.Function):
    """LSQ fake quantization as one node of 6 forward and 2 backward passes over ``x``.

    With ``u = x/s``, ``c = clamp(u, −Qn, Qp)`` and the codes ``r = round(c)``, the straight-through
    gradients are ``∂x = grad·[c = u]`` and ``∂s = g·Σ grad·d`` with ``d = r − u`` in range and ``d = r`` (the
    clamped code) outside, and 0 for a step below 1e-5 (the ``clamp_min``). Forward keeps only the float 0/1
    in-range mask and ``d``; backward is one multiply and one reduction (a dot product for a single step).
    These are the gradients autograd gives the composition ``round_ste(clamp(x/s))·s``, up to float rounding
    (it forms ``grad·s/s`` and two separate sums; tested to 1 ulp-scale tolerances)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
        s = step.clamp_min(1e-5)
        u = x / s  # (x's shape)
        codes = u.clamp(-qn, qp)
        inside = torch.eq(codes, u, out=torch.empty_like(u))  # 1 in range, 0 clamped (or NaN)
        codes.round_()  # the integer codes r
        d = torch.addcmul(codes, u, inside, value=-1.0)  # ∂out/∂s: r − u in range, r outside
        ctx.save_for_backward(step, inside, d)
        ctx.g = g
        return codes.mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        step, inside, d = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            if step.numel() == 1 and grad.is_contiguous() and d.is_contiguous():  # one pass, no temporary
                grad_s = torch.dot(grad.view(-1), d.view(-1).to(grad.dtype)).reshape(step.shape)
            else:  # (a strided q, k or v of attention: reshape(-1) would copy both)
                grad_s = (grad * d).sum_to_size(step.shape)
            grad_step = grad_s.mul_(ctx.g).masked_fill_(step.ge(1e-5).logical_not_(), 0.0)  # clamp_min (NaN too)
        return grad_x, grad_step, None, None, None


class LsqWeightQuantizer(nn.Module):
    """LSQ for a ``(out, in)`` weight: one learned step per output row, initialised to ``2·mean|w|/√Qp``."""

    offset = 0.0  # dequantized weight = step · (code + offset)

    def __init__(self, weight: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.qn, self.qp = lsq_range(bits, signed=True)
        rows = weight.detach().reshape(weight.shape[0], -1)  # (out, in)
        self.fan_in = rows.shape[1]
        init = 2 * rows.abs().mean(1, keepdim=True) / math.sqrt(self.qp)  # (out, 1)
        self.step = nn.Parameter(init.clamp_min(1e-5))

    def forward(self, weight: Tensor) -> Tensor:
        return lsq_quantize(weight, self.step, qn=self.qn, qp=self.qp, g=lsq_grad_scale(self.qp, self.fan_in))

    @torch.no_grad()
    def codes(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes (``weight``'s shape) and per-row scale: ``weight ≈ scale·(codes + offset)``."""
        s = self.step.clamp_min(1e-5)
        return (weight / s).clamp(-self.qn, self.qp).round(), s.detach().clone()


class LsqActQuantizer(nn.Module):
    """LSQ for activations: one learned step, initialised from the first batch to ``2·mean|x|/√Qp``."""

    def __init__(self, bits: int, *, signed: bool = True) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = signed
        self.qn, self.qp = lsq_range(bits, signed=signed)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))  # saved with checkpoints
        self._initialized = False  # the same flag as a Python bool: no device sync on every forward
        self.register_load_state_dict_post_hook(LsqActQuantizer._sync_flag)

    @staticmethod
    def _sync_flag(module: LsqActQuantizer, incompatible_keys: object) -> None:
        module._initialized = bool(module.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            with torch.no_grad():
                self.step.copy_((2 * x.abs().mean() / math.sqrt(self.qp)).clamp_min(1e-5))
                self.initialized.fill_(True)
            self._initialized = True
        n = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()  # features per sample
        return lsq_quantize(x, self.step, qn=self.qn, qp=self.qp, g=lsq_grad_scale(self.qp, n))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"
