"""Metaplastic binarized neural networks (Laborieux et al., Nat. Commun. 2021), the baseline of
``variational-binary-cl``. Reference code: ``Laborieux-Axel/SynapticMetaplasticityBNN`` (``models_utils.py``).

Each binary weight is ``sign(W_h)`` of a real hidden weight ``W_h`` (straight-through gradient). Activations
are ``sign`` with a straight-through estimator whose gradient is zero where ``|x| > 1``; BatchNorm without
running statistics, no bias. :class:`MetaplasticAdam` takes the usual Adam step except where the step would
shrink ``|W_h|`` towards a sign flip (``sign(W_h)·exp_avg > 0``): there the first moment used for the step is
damped by ``f_meta = 1 − tanh²(m·|W_h|)``. The stored moment is not changed, W_h is not clipped, biases and
BatchNorm parameters are not modulated. ``m = 0`` is plain binary training (BNN with Adam).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.registry import register


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` (with sign(0) = +1) forward; gradient passed straight through where ``|x| ≤ 1``."""
    return _SignSTE.apply(x)


class BinaryLinear(nn.Linear):
    """A linear layer whose forward uses ``sign(W_h)``; ``weight`` is the hidden weight ``W_h``."""

    def __init__(self, in_features: int, out_features: int, *, init_width: float = 0.1) -> None:
        super().__init__(in_features, out_features, bias=False)
        nn.init.uniform_(self.weight, -init_width, init_width)

    def forward(self, x: Tensor) -> Tensor:  # (B, in) -> (B, out)
        w = self.weight
        binary = w + (torch.where(w >= 0, 1.0, -1.0).to(w.dtype) - w).detach()  # straight-through in W_h
        return nn.functional.linear(x, binary)


class BinaryMLP(nn.Module):
    """Flatten → [BinaryLinear → BatchNorm → sign]* → BinaryLinear → BatchNorm (Laborieux's BNN)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.linears = nn.ModuleList(BinaryLinear(a, b) for a, b in zip(widths, widths[1:], strict=False))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b, track_running_stats=False) for b in widths[1:])

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, classes)
        a = x.flatten(1)
        for i, (lin, norm) in enumerate(zip(self.linears, self.norms, strict=False)):
            a = norm(lin(a))
            if i < len(self.linears) - 1:
                a = sign_ste(a)
        return a


def meta_factor(hidden: Tensor, update_direction: Tensor, m: float) -> Tensor:
    """The factor on the first moment: ``1 − tanh²(m·|W_h|)`` where ``sign(W_h)·exp_avg > 0``, else 1.

    ``update_direction`` is Adam's ``exp_avg``; the step is ``−lr·exp_avg/denom``, so
    ``sign(W_h)·exp_avg > 0`` means the step decreases ``|W_h|``, i.e. moves the weight towards a sign flip.
    """
    towards_flip = torch.sign(hidden) * update_direction > 0
    damp = 1.0 - torch.tanh(m * hidden.abs()) ** 2
    return torch.where(towards_flip, damp, torch.ones_like(damp))


@dataclass(frozen=True)
class MetaplasticityConfig:
    """Laborieux's defaults: Adam lr 0.005, weight decay 1e-7, meta strength ``m`` per binary layer."""

    m: float = 1.35
    lr: float = 0.005
    weight_decay: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.m < 0:
            raise WeightlabError(f"metaplasticity m must be ≥ 0, got {self.m}")
        if not self.lr > 0:
            raise WeightlabError(f"lr must be > 0, got {self.lr}")


@register("method", "metaplasticity")
class MetaplasticAdam(torch.optim.Optimizer):
    """Adam whose step on the hidden weights of binary layers is damped towards sign flips (``Adam_meta``).

    Args:
        model: its :class:`BinaryLinear` weights get the metaplastic rule, every other parameter plain Adam.
    """

    def __init__(self, model: nn.Module, config: MetaplasticityConfig = MetaplasticityConfig()) -> None:
        binary = [mod.weight for mod in model.modules() if isinstance(mod, BinaryLinear)]
        if not binary:
            raise WeightlabError(f"{type(model).__name__} has no BinaryLinear layer for the metaplastic rule")
        ids = {id(p) for p in binary}
        rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        groups = [{"params": binary, "meta": config.m}, {"params": rest, "meta": 0.0}]
        super().__init__(
            [g for g in groups if g["params"]],
            {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay},
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                denom = st["exp_avg_sq"].div(bc2).sqrt().add_(group["eps"])
                first = st["exp_avg"]
                if group["meta"] > 0:
                    first = first * meta_factor(p, first, group["meta"])
                p.addcdiv_(first, denom, value=-group["lr"] / bc1)
