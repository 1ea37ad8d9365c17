"""OFQ's activation quantizer: LSQ with one step per token and a learnable shift (paper key ``ofq``).

OFQ quantizes every ``(B, N, C)`` activation with one learned step per token position (``s`` of length ``N``,
spec §2.6) and wraps its quantizers in learnable per-channel biases. Both are options of
:class:`~.api.QuantConfig` (``act_granularity="token"``, ``act_shift=True``); with both off the layers keep
the per-tensor :class:`~.lsq.LsqActQuantizer`, unchanged. With a shift ``β`` the quantizer is LSQ+'s form

    x̂ = round(clamp((x − β)/s, −Qn, Qp))·s + β

so ``β`` receives the gradient of the clamped entries only (inside the range the straight-through estimator
cancels it). ``β`` has one value per channel (the last dimension, per head when the input is
``(B, H, N, d)``) and starts at 0, as the reference's biases: the quantizer's first forward equals LSQ's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant.lsq import LsqActQuantizer, lsq_grad_scale, lsq_quantize


@dataclass(frozen=True)
class ActOptions:
    """How activations are quantized (``ofq``).

    Attributes:
        per_token: one learned step per token (the second-to-last dimension) instead of one per tensor.
        shift: a learned per-channel offset ``β`` (LSQ+): ``round_clip((x − β)/s)·s + β``.
    """

    per_token: bool = False
    shift: bool = False

    @property
    def plain(self) -> bool:
        """Both off: today's per-tensor LSQ."""
        return not (self.per_token or self.shift)


def token_step_init(x: Tensor, qp: int) -> Tensor:
    """Per-token LSQ step ``2·mean|x|/√Qp`` over everything but the token dimension: ``(..., N, C)`` → ``(N, 1)``."""
    per_token = x.detach().abs().transpose(0, -2).reshape(x.shape[-2], -1).mean(1, keepdim=True)  # (N, 1)
    return (2 * per_token / math.sqrt(qp)).clamp_min(1e-5)


def shift_shape(x: Tensor) -> tuple[int, ...]:
    """The shape of a per-channel shift for ``x``: ``(B, N, C)`` → ``(1, C)``, ``(B, H, N, d)`` → ``(H, 1, d)``,
    ``(B, C)`` → ``(C,)``."""
    if x.dim() >= 3:
        return (*x.shape[1:-2], 1, x.shape[-1])
    return tuple(x.shape[-1:])


class OfqActQuantizer(LsqActQuantizer):
    """LSQ for activations with per-token steps and/or a learned shift (``ofq``).

    Per token the step is ``(N, 1)``, initialised from the first batch to ``2·mean|x|/√Qp`` of each token (the
    mean over the batch and every other dimension); its gradient is scaled by ``1/√(Qp·M)`` with ``M`` the
    number of entries that share a step (``numel/N``, batch included, as the reference). Without
    ``per_token`` the step is per tensor, initialised and scaled as :class:`~.lsq.LsqActQuantizer`'s. The
    step and shift take their shapes from the first batch (the Parameters keep their identity, so an
    optimizer built before it sees them; AdamW's state is created at the first step).
    """

    def __init__(self, bits: int, *, signed: bool = True, options: ActOptions = ActOptions()) -> None:
        super().__init__(bits, signed=signed)
        self.per_token = options.per_token
        self.shift = nn.Parameter(torch.zeros(())) if options.shift else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("step", "shift"):  # saved after the first batch: take the saved shapes
            param, saved = getattr(self, name), state_dict.get(prefix + name)
            if param is not None and saved is not None and param.shape != saved.shape:
                param.data = torch.empty_like(saved, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        if self.shift is not None:
            self.shift.data = x.new_zeros(shift_shape(x))
        if self.per_token:
            self.step.data = token_step_init(x, self.qp)
        else:
            self.step.copy_((2 * x.abs().mean() / math.sqrt(self.qp)).clamp_min(1e-5))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor) -> Tensor:
        if self.per_token and x.dim() < 3:
            raise WeightlabError(f"per-token activation quantization needs (B, N, C) inputs, got shape "
                                 f"{tuple(x.shape)}")
        if not self._initialized:
            self._init_from(x)
        if self.per_token:
            if x.shape[-2] != self.step.shape[0]:
                raise WeightlabError(f"per-token activation quantizer was initialised for {self.step.shape[0]} "
                                     f"tokens, got an input with {x.shape[-2]} (shape {tuple(x.shape)})")
            g = lsq_grad_scale(self.qp, x.numel() // x.shape[-2])
        else:
            g = lsq_grad_scale(self.qp, x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel())
        if self.shift is None:
            return lsq_quantize(x, self.step, qn=self.qn, qp=self.qp, g=g)
        return lsq_quantize(x - self.shift, self.step, qn=self.qn, qp=self.qp, g=g) + self.shift

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_token={self.per_token}, shift={self.shift is not None}"


def make_act_quantizer(bits: int | None, *, signed: bool = True, options: ActOptions = ActOptions()) -> nn.Module:
    """An LSQ activation quantizer: today's per-tensor :class:`~.lsq.LsqActQuantizer` when ``options`` are
    off, else an :class:`OfqActQuantizer`; the identity when ``bits`` is None (full-precision activations)."""
    if bits is None:
        return nn.Identity()
    if options.plain:
        return LsqActQuantizer(bits, signed=signed)
    return OfqActQuantizer(bits, signed=signed, options=options)
