"""Knowledge distillation from the full-precision teacher, as OFQ trains (paper key ``ofq``).

The reference's ``KDLossSoftandHard``: ``L = CE(student, y) + soft-CE(student, teacher)`` with the soft term
``−(1/B) Σ_b Σ_k softmax(t_b/T)_k · log softmax(s_b/T)_k`` at ``T = 1`` (no T² factor, weight 1 each).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.methods.weight_aligning.aligning import kd_loss
from weightlab.registry import register
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState


@register("method", "ofq-distillation")
class SoftHardDistillation(Callback):
    """Callback: adds the soft cross-entropy to the frozen ``teacher``'s predictions to the loop's (hard) loss.

    Args:
        teacher: the full-precision model (put in eval mode; never trained here).
        temperature: the softmax temperature of both sides (the reference: 1).
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise WeightlabError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher, self.temperature = teacher, temperature

    def on_experience_start(self, state: LoopState) -> None:
        self.teacher.to(state.device).eval()

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.teacher(batch.x)  # (B, classes)
        return loss + kd_loss(logits, target, temperature=self.temperature)
