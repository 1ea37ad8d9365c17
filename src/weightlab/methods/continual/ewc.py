"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) as a callback: the real-valued baseline of
``variational-binary-cl`` and ``rnn-hypernetwork``.

At the end of each experience the diagonal empirical Fisher ``F = E[(∂ℓ/∂θ)²]`` (per-sample gradients of the
training loss with the true labels) is computed on up to ``fisher_samples`` training samples and added to the
running sum over tasks; the anchor θ* becomes the current weights. Training then minimises
``loss + (λ/2) Σ_i F_i (θ_i − θ*_i)²`` through the loop's ``loss`` hook.

    ewc = EWC(model, EWCConfig(lam=100.0))
    for exp in stream:
        train(model, exp.train, tc, callbacks=[ewc], experience=exp)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from weightlab.data.arrays import ArrayDataset, Batch
from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import ForwardFn, LoopState, LossFn, default_forward, per_sample_cross_entropy


@dataclass(frozen=True)
class EWCConfig:
    """``lam`` is λ of the penalty (5000 in Laborieux's permuted-MNIST runs); ``fisher_samples`` caps the
    number of samples the Fisher is estimated on."""

    lam: float = 5000.0
    fisher_samples: int = 256

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise WeightlabError(f"EWC lam must be ≥ 0, got {self.lam}")
        if self.fisher_samples < 1:
            raise WeightlabError(f"fisher_samples must be ≥ 1, got {self.fisher_samples}")


def diagonal_fisher(
    model: nn.Module,
    data: ArrayDataset,
    *,
    max_samples: int = 256,
    forward: ForwardFn = default_forward,
    loss_fn: LossFn = per_sample_cross_entropy,
) -> dict[str, Tensor]:
    """Mean squared per-sample gradient of each trainable parameter over the first ``max_samples`` samples."""
    if len(data) == 0:
        raise WeightlabError("cannot estimate the Fisher on an empty dataset")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(iter(params.values())).device
    n = min(len(data), max_samples)
    was_training = model.training
    model.eval()
    try:
        for i in range(n):
            batch = data.batch(slice(i, i + 1)).to(device)
            loss = loss_fn(forward(model, batch), batch.y).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=False):
                if g is not None:
                    fisher[name] += g.detach() ** 2
    finally:
        model.train(was_training)
    return {k: v / n for k, v in fisher.items()}


def ewc_penalty(params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> Tensor:
    """``½ Σ_i F_i (θ_i − θ*_i)²`` over the named tensors of ``fisher``."""
    total = torch.zeros(())
    for name, f in fisher.items():
        total = total + 0.5 * (f * (params[name] - anchor[name]) ** 2).sum()
    return total


@register("method", "ewc")
class EWC(Callback):
    """The EWC penalty through the ``loss`` hook; Fisher and anchor updated at each experience's end.

    Args:
        forward: how the model is called on a batch (e.g. with task ids for a multi-head model).
    """

    def __init__(
        self, model: nn.Module, config: EWCConfig = EWCConfig(), *, forward: ForwardFn = default_forward
    ) -> None:
        self.model = model
        self.config = config
        self.forward = forward
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        if not self.fisher or self.config.lam == 0:
            return loss
        params = dict(self.model.named_parameters())
        return loss + self.config.lam * ewc_penalty(params, self.anchor, self.fisher).to(loss.device)

    def on_experience_end(self, state: LoopState) -> None:
        data: Dataset | None = getattr(state.experience, "train", None)
        if not isinstance(data, ArrayDataset):
            raise WeightlabError(
                "EWC needs train(..., experience=Experience) whose .train is an ArrayDataset, "
                f"got experience {type(state.experience).__name__}"
            )
        new = diagonal_fisher(self.model, data, max_samples=self.config.fisher_samples, forward=self.forward)
        for name, f in new.items():
            # a parameter added since the last task (e.g. a new head) starts with zero importance
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None or old.shape != f.shape else old + f
        self.anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.fisher}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint (``fisher.*`` and ``anchor.*``)."""
        return {
            **{f"fisher.{k}": v for k, v in self.fisher.items()},
            **{f"anchor.{k}": v for k, v in self.anchor.items()},
        }

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        device = next(self.model.parameters()).device  # checkpoints load on the CPU
        self.fisher = {k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("anchor.")}
