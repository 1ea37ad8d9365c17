"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) as a callback: the real-valued baseline of
``variational-binary-cl`` and ``rnn-hypernetwork``.

At the end of each experience the diagonal empirical Fisher ``F = E[(∂ℓ/∂θ)²]`` (per-sample gradients of the
training loss with the true labels) is computed on up to ``fisher_samples`` training samples. Two ways to keep
it (``EWCConfig.anchors``):

* ``"online"`` (default): the Fisher is added to a running sum over tasks and the one anchor θ* becomes the
  current weights, so training minimises ``loss + (λ/2) Σ_i F_i (θ_i − θ*_i)²`` — online EWC with γ = 1
  (Schwarz et al. 2018), not the paper's per-task penalty;
* ``"per-task"``: every finished task ``k`` keeps its own Fisher and anchor, and the penalty is
  ``(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²`` (Kirkpatrick et al.).

    ewc = EWC(model, EWCConfig(lam=100.0))
    for exp in stream:
        train(model, exp.train, tc, callbacks=[ewc], experience=exp)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    number of samples the Fisher is estimated on; ``anchors`` is ``"online"`` (one anchor, summed Fisher:
    online EWC with γ = 1) or ``"per-task"`` (one anchor and Fisher per finished task)."""

    lam: float = 5000.0
    fisher_samples: int = 256
    anchors: Literal["online", "per-task"] = "online"

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise WeightlabError(f"EWC lam must be ≥ 0, got {self.lam}")
        if self.fisher_samples < 1:
            raise WeightlabError(f"fisher_samples must be ≥ 1, got {self.fisher_samples}")
        if self.anchors not in ("online", "per-task"):
            raise WeightlabError(f"EWC anchors must be 'online' or 'per-task', got {self.anchors!r}")


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
        self.fisher: dict[str, Tensor] = {}  # online: the summed Fisher
        self.anchor: dict[str, Tensor] = {}
        self.tasks: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # per-task: (Fisher, anchor) each

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        terms = self.tasks if self.config.anchors == "per-task" else [(self.fisher, self.anchor)]
        if not terms or not terms[0][0] or self.config.lam == 0:
            return loss
        params = dict(self.model.named_parameters())
        penalty = sum(ewc_penalty(params, anchor, fisher) for fisher, anchor in terms)
        return loss + self.config.lam * penalty.to(loss.device)

    def on_experience_end(self, state: LoopState) -> None:
        data: Dataset | None = getattr(state.experience, "train", None)
        if not isinstance(data, ArrayDataset):
            raise WeightlabError(
                "EWC needs train(..., experience=Experience) whose .train is an ArrayDataset, "
                f"got experience {type(state.experience).__name__}"
            )
        new = diagonal_fisher(self.model, data, max_samples=self.config.fisher_samples, forward=self.forward)
        if self.config.anchors == "per-task":
            params = dict(self.model.named_parameters())
            self.tasks.append((new, {n: params[n].detach().clone() for n in new}))
            return
        for name, f in new.items():
            # a parameter added since the last task (e.g. a new head) starts with zero importance
            old = self.fisher.get(name)
            self.fisher[name] = f if old is None or old.shape != f.shape else old + f
        self.anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.fisher}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint (``fisher.*`` and ``anchor.*``; per task ``<k>.fisher.*``, ``<k>.anchor.*``)."""
        out = {
            **{f"fisher.{k}": v for k, v in self.fisher.items()},
            **{f"anchor.{k}": v for k, v in self.anchor.items()},
        }
        for j, (fisher, anchor) in enumerate(self.tasks):
            out |= {f"{j}.fisher.{k}": v for k, v in fisher.items()} | {f"{j}.anchor.{k}": v for k, v in anchor.items()}
        return out

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        device = next(self.model.parameters()).device  # checkpoints load on the CPU

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

        self.fisher, self.anchor = part("fisher."), part("anchor.")
        n_tasks = len({k.split(".", 1)[0] for k in tensors if k.split(".", 1)[0].isdigit()})
        self.tasks = [(part(f"{j}.fisher."), part(f"{j}.anchor.")) for j in range(n_tasks)]
