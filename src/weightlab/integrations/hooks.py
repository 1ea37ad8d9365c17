"""Run weightlab callbacks from a training loop of your own (the manual protocol).

A :class:`~weightlab.train.Callback` only sees a :class:`~weightlab.train.LoopState` and the hooks the loop
calls. :class:`CallbackRunner` holds that state and calls the hooks that each callback overrides, in the
order :func:`weightlab.train.train` does, so a plain PyTorch loop gives the same result as ``train``:

    runner = CallbackRunner(model, optimizer, [tracker, cga])
    runner.experience_start()                                   # once, before the first step
    for x, y in loader:
        batch = runner.batch(Batch(x, y))                       # on_batch (replay, adversarial examples)
        logits = runner.logits(batch, model(batch.x))           # transform_logits
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        loss = runner.loss(batch, logits, losses)               # sample_weights, then loss (EWC, KD)
        optimizer.zero_grad()
        loss.backward()
        runner.after_backward()                                 # gradient masks (CGA)
        optimizer.step()
        runner.after_step(loss)                                 # EMA, clipping weights, trackers
    runner.experience_end()                                     # once, after the last step (EWC's Fisher)

Only the hooks some callback overrides need calling; clip gradients between ``after_backward`` and the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.train.callbacks import Callback, overriding
from weightlab.train.loop import LoopState, TrainConfig


class CallbackRunner:
    """The hooks of ``callbacks`` for a loop of your own; ``state`` is the :class:`LoopState` they see.

    Args:
        model: the model being trained (``state.model``).
        optimizer: the optimizer that steps it (``state.optimizer``).
        callbacks: weightlab callbacks, called in this order at every hook.
        experience: passed to the callbacks as ``state.experience`` (e.g. an ``Experience`` for EWC).
        config: ``state.config`` (the loop's settings, for callbacks that read them).
        seed: seed of ``state.generator``, the generator callbacks draw from (adversarial starts).
        total_steps: ``state.total_steps`` where known.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, callbacks: Sequence[Callback], *,
                 experience: Any = None, config: TrainConfig = TrainConfig(), seed: int = 0,
                 total_steps: int = 0) -> None:
        bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
        if bad:
            raise WeightlabError(f"expected weightlab Callback objects, got {', '.join(bad)}")
        self.callbacks = list(callbacks)
        device = next(model.parameters()).device
        self.state = LoopState(model, optimizer, config, device, torch.Generator().manual_seed(seed), experience,
                               total_steps=total_steps)
        self._hooks = {hook: overriding(self.callbacks, hook) for hook in (
            "on_experience_start", "on_batch", "transform_logits", "sample_weights", "loss", "after_backward",
            "after_step", "on_experience_end")}

    def uses(self, hook: str) -> list[Callback]:
        """The callbacks that override ``hook``."""
        return self._hooks[hook]

    def experience_start(self) -> None:
        """``on_experience_start``: before the first step."""
        for cb in self._hooks["on_experience_start"]:
            cb.on_experience_start(self.state)

    def batch(self, batch: Batch) -> Batch:
        """``on_batch``: the batch to train on (callbacks may replace it)."""
        for cb in self._hooks["on_batch"]:
            batch = cb.on_batch(self.state, batch)
        return batch

    def logits(self, batch: Batch, logits: Tensor) -> Tensor:
        """``transform_logits``: the logits ``(B, classes)`` the training loss sees."""
        for cb in self._hooks["transform_logits"]:
            logits = cb.transform_logits(self.state, batch, logits)
        return logits

    def loss(self, batch: Batch, logits: Tensor, losses: Tensor) -> Tensor:
        """The scalar loss from per-sample ``losses`` ``(B,)`` (``sample_weights``: a weighted sum, else the
        mean), transformed by the ``loss`` hooks; a scalar ``losses`` needs no ``sample_weights`` callback."""
        weights = None
        if losses.dim() == 0 and self._hooks["sample_weights"]:
            raise WeightlabError(f"{type(self._hooks['sample_weights'][0]).__name__} reweights samples: pass "
                                 "per-sample losses (B,), e.g. F.cross_entropy(..., reduction='none')")
        for cb in self._hooks["sample_weights"]:
            returned = cb.sample_weights(self.state, batch, losses)
            weights = returned if returned is not None else weights
        loss = losses.mean() if weights is None else (weights * losses).sum()
        for cb in self._hooks["loss"]:
            loss = cb.loss(self.state, batch, logits, loss)
        return loss

    def after_backward(self) -> None:
        """``after_backward``: gradients exist, before clipping and the optimizer step."""
        for cb in self._hooks["after_backward"]:
            cb.after_backward(self.state)

    def after_step(self, loss: Tensor | None = None) -> None:
        """``after_step``: the optimizer stepped (counts the step; ``loss`` becomes ``state.loss``)."""
        self.state.step += 1
        self.state.loss = None if loss is None else loss.detach()
        for cb in self._hooks["after_step"]:
            cb.after_step(self.state)

    def experience_end(self) -> None:
        """``on_experience_end``: after the last step."""
        for cb in self._hooks["on_experience_end"]:
            cb.on_experience_end(self.state)
