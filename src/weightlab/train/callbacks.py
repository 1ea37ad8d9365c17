"""Callbacks: how methods act during training without reaching into the loop.

A callback overrides the hooks it needs; the loop calls only overridden hooks. In the order the loop calls them:

``on_experience_start(state)``
    before the first step (build a teacher, expand a head, snapshot weights).
``on_batch(state, batch) -> Batch``
    replace the mini-batch (append replayed samples, swap in adversarial examples).
``transform_logits(state, batch, logits) -> Tensor``
    change the logits the training loss sees (mask absent classes).
``sample_weights(state, batch, losses) -> Tensor | None``
    per-sample weights ``(B,)`` summing to 1 for the per-sample losses (instance reweighting); the last
    callback that returns weights wins, and without any the loss is the mean.
``loss(state, batch, logits, loss) -> Tensor``
    transform the scalar loss (add a penalty, mix in distillation).
``after_backward(state)``
    gradients exist (mask or rescale them).
``after_step(state)``
    the optimizer stepped (clip weights, update an EMA, inject noise, freeze entries again).
``on_experience_end(state)``
    after the last step (align weights, update a memory, compute importances).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from weightlab.data.arrays import Batch

if TYPE_CHECKING:  # the loop imports this module, so LoopState is for type checkers only
    from weightlab.train.loop import LoopState

HOOKS = ("on_experience_start", "on_batch", "transform_logits", "sample_weights", "loss", "after_backward",
         "after_step", "on_experience_end")


class Callback:
    """Base class: every hook is a no-op."""

    def on_experience_start(self, state: LoopState) -> None:
        return None

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        return batch

    def transform_logits(self, state: LoopState, batch: Batch, logits: Tensor) -> Tensor:
        return logits

    def sample_weights(self, state: LoopState, batch: Batch, losses: Tensor) -> Tensor | None:
        return None

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        return loss

    def after_backward(self, state: LoopState) -> None:
        return None

    def after_step(self, state: LoopState) -> None:
        return None

    def on_experience_end(self, state: LoopState) -> None:
        return None


def overriding(callbacks: list[Callback], hook: str) -> list[Callback]:
    """The callbacks that override ``hook`` (so the loop skips no-op calls on its hot path)."""
    base = getattr(Callback, hook)
    return [cb for cb in callbacks if getattr(type(cb), hook, base) is not base]
