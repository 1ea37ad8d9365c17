"""Weight Aligning (WA) for class-incremental learning, as PyCIL runs it.

Paper key: ``weight-aligning`` — Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental
Learning", CVPR 2020 (spec/continual.md §1). At incremental step ``t`` with ``n`` old and ``m`` new classes:

1. expand the classifier head by ``m`` rows (:func:`expand_head`; new rows fresh, zero bias);
2. train on the new data ∪ the exemplar memory with
   ``L = (1 − λ)·CE(o, y) + λ·KD(o[:, :n], ô[:, :n])``, ``λ = n / (n + m)``, where ``ô`` are the logits of the
   frozen previous model and ``KD`` is :func:`kd_loss` (T = 2, no T² factor) on every sample;
3. optionally clip the head weights to ≥ 0 after every optimizer step (:class:`ClipHeadWeights`);
4. align: ``γ = mean_{i old} ||W_i|| / mean_{j new} ||W_j||`` and ``W_new ← γ·W_new`` (:func:`weight_align`,
   bias untouched);
5. update the herding memory (:mod:`weightlab.methods.continual.exemplars`) and keep a frozen copy as the next teacher.

:class:`ClassIncrementalLearner` runs this recipe (and its baselines: finetune, replay, KD + replay) with the
one training loop :func:`weightlab.train.train`; the pieces are usable on their own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset, Batch, concat
from weightlab.errors import WeightlabError
from weightlab.methods.continual.exemplars import HerdingSelector, NearestMeanClassifier
from weightlab.methods.continual.replay import ReplayBuffer
from weightlab.models.heads import ExpandableHead
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import LoopState, TrainConfig, train

Selection = Literal["herding", "random"]


# ---------------------------------------------------------------------------------------------- formulas


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0) -> Tensor:
    """PyCIL's ``_KD_loss``: ``−(1/B) Σ_b Σ_k softmax(ô_b/T)_k · log softmax(o_b/T)_k`` (no T² factor).

    Args:
        student_logits: ``(B, n_old)`` logits of the model being trained, restricted to the old classes.
        teacher_logits: ``(B, n_old)`` logits of the frozen previous model.
    """
    if student_logits.shape != teacher_logits.shape:
        raise WeightlabError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if not temperature > 0:
        raise WeightlabError(f"kd_loss: temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(student_logits / temperature, dim=1)  # (B, n_old)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)  # (B, n_old)
    return -(q * log_p).sum(1).mean()


def row_norms(weight: Tensor) -> Tensor:
    """L2 norm of every row of a classifier weight ``(classes, features)`` → ``(classes,)``."""
    return weight.detach().norm(dim=1)


def align_rows(weight: Tensor, n_old: int) -> tuple[float, Tensor]:
    """``γ = mean(||W_old rows||) / mean(||W_new rows||)`` and a copy of ``weight`` with the new rows × γ.

    Args:
        weight: ``(classes, features)``; rows ``0..n_old-1`` are the old classes, the rest the new ones.
        n_old: number of old classes (``1 ≤ n_old < classes``).
    """
    if weight.ndim != 2:
        raise WeightlabError(
            f"weight aligning expects a (classes, features) weight, got {tuple(weight.shape)}"
        )
    if not 1 <= n_old < weight.shape[0]:
        raise WeightlabError(
            f"n_old must be between 1 and {weight.shape[0] - 1} (the head has {weight.shape[0]} "
            f"rows), got {n_old}"
        )
    norms = row_norms(weight)
    new_mean = norms[n_old:].mean()
    if new_mean == 0:
        raise WeightlabError("weight aligning: the new classes' rows are all zero, so γ is undefined")
    gamma = (norms[:n_old].mean() / new_mean).item()
    aligned = weight.detach().clone()
    aligned[n_old:] *= gamma
    return gamma, aligned


def weight_align(
    head: ExpandableHead | nn.Linear, n_old: int, *, align_bias: bool = False
) -> tuple[float, nn.Module]:
    """Weight Aligning of a classifier head: ``(γ, aligned copy of head)``; ``head`` is not modified.

    Args:
        head: a linear head whose first ``n_old`` rows are the old classes.
        align_bias: also scale the new classes' bias by γ (cvww's ``--apply-to-bias``; PyCIL does not).
    """
    gamma, weight = align_rows(head.weight, n_old)
    aligned = copy.deepcopy(head)
    with torch.no_grad():
        aligned.weight.copy_(weight)
        if align_bias and aligned.bias is not None:
            aligned.bias[n_old:] *= gamma
    return gamma, aligned


def expand_head(model: nn.Module, n_new: int) -> ExpandableHead:
    """Append ``n_new`` rows to ``model.head`` (an :class:`ExpandableHead`); new biases start at zero
    (PyCIL)."""
    head = getattr(model, "head", None)
    if not isinstance(head, ExpandableHead):
        raise WeightlabError(
            f"expand_head needs model.head to be an ExpandableHead, got {type(head).__name__}"
        )
    if n_new < 1:
        raise WeightlabError(f"expand_head: n_new must be ≥ 1, got {n_new}")
    n_old = head.num_classes
    head.expand(n_new)
    if head.bias is not None:
        with torch.no_grad():
            head.bias[n_old:] = 0.0
    return head


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` (the KD teacher)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@dataclass(frozen=True)
class WAConfig:
    """Weight Aligning and its baselines (paper key ``weight-aligning``; defaults from PyCIL
    ``exps/wa.json``).

    Args:
        kd: distil the previous model (False: finetune / replay baselines).
        align: weight aligning after each incremental step.
        memory: total exemplar memory, shared equally by the seen classes (0: no memory, finetune).
        memory_per_class: fixed memory per class instead (PyCIL's ``fixed_memory``; total grows).
        selection: ``herding`` (iCaRL) or ``random`` exemplars.
        temperature: KD temperature T.
        clip: clip head weights to ≥ 0 after every step.
        align_bias: also scale the new rows' bias by γ.
    """

    kd: bool = True
    align: bool = True
    memory: int = 2000
    memory_per_class: int | None = None
    selection: Selection = "herding"
    temperature: float = 2.0
    clip: bool = False
    align_bias: bool = False

    def __post_init__(self) -> None:
        if self.memory < 0:
            raise WeightlabError(f"memory must be ≥ 0, got {self.memory}")
        if self.memory_per_class is not None and self.memory_per_class < 1:
            raise WeightlabError(f"memory_per_class must be ≥ 1 or None, got {self.memory_per_class}")
        if self.selection not in ("herding", "random"):
            raise WeightlabError(f"selection must be 'herding' or 'random', got {self.selection!r}")
        if not self.temperature > 0:
            raise WeightlabError(f"temperature must be > 0, got {self.temperature}")

    @property
    def uses_memory(self) -> bool:
        return self.memory > 0 or self.memory_per_class is not None


# ---------------------------------------------------------------------------------------------- callbacks


@register("method", "knowledge-distillation")
class KnowledgeDistillation(Callback):
    """``L = (1 − λ)·L_CE + λ·kd_loss(o[:, :n_old], teacher(x)[:, :n_old])`` with ``λ = n_old / n_total``
    (PyCIL's ``kd_lambda``, from the logits' width).

    Args:
        teacher: the frozen previous model (see :func:`frozen_copy`).
        n_old: classes the teacher knows (its first ``n_old`` logits are distilled).
        config: WA's settings; the KD temperature is ``config.temperature`` (T = 2).
    """

    def __init__(self, teacher: nn.Module, n_old: int, config: WAConfig = WAConfig()) -> None:
        if n_old < 1:
            raise WeightlabError(f"KnowledgeDistillation needs n_old ≥ 1 old classes, got {n_old}")
        self.teacher, self.n_old, self.config = teacher, n_old, config

    def on_experience_start(self, state: LoopState) -> None:
        self.teacher.to(state.device).eval()

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        with torch.no_grad():
            old = self.teacher(batch.x)[:, : self.n_old]  # (B, n_old)
        lam = self.n_old / logits.shape[1]
        return (1 - lam) * loss + lam * kd_loss(logits[:, : self.n_old], old, temperature=self.config.temperature)


@register("method", "clip-head-weights")
class ClipHeadWeights(Callback):
    """Clip the head's weights to ``≥ 0`` after every optimizer step (WA's optional weight clipping)."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def after_step(self, state: LoopState) -> None:
        with torch.no_grad():
            self.head.weight.clamp_(min=0.0)


@register("method", "align-head")
class AlignHead(Callback):
    """Weight Aligning after training: scale the new rows of ``model.head`` by γ (in place).

    After the experience, ``gamma``, ``norms_before`` and ``norms_after`` ``(classes,)`` hold what happened.
    The new rows' bias is scaled too when ``config.align_bias``.
    """

    def __init__(self, head: nn.Module, n_old: int, config: WAConfig = WAConfig()) -> None:
        self.head, self.n_old, self.config = head, n_old, config
        self.gamma = float("nan")
        self.norms_before = self.norms_after = torch.zeros(0)

    def on_experience_end(self, state: LoopState) -> None:
        self.norms_before = row_norms(self.head.weight).cpu()
        self.gamma, aligned = weight_align(self.head, self.n_old, align_bias=self.config.align_bias)
        with torch.no_grad():
            self.head.weight.copy_(aligned.weight)
            if self.head.bias is not None:
                self.head.bias.copy_(aligned.bias)
        self.norms_after = row_norms(self.head.weight).cpu()


# ---------------------------------------------------------------------------------------------- the recipe


@dataclass
class StepRecord:
    """What one incremental step did: γ and the head's row norms before/after aligning (NaN/empty if none)."""

    n_old: int
    n_total: int
    gamma: float = float("nan")
    norms_before: Tensor | None = None
    norms_after: Tensor | None = None


@register("method", "weight-aligning")
class ClassIncrementalLearner:
    """Class-incremental training with an expanding head: WA, KD + replay, replay or finetune (by ``config``).

    Labels must be ``0..n-1`` in order of arrival (the classes of step ``t`` follow those of step ``t − 1``).

        learner = ClassIncrementalLearner(model, WAConfig())      # model.head: an ExpandableHead
        for exp in stream:
            record = learner.learn(exp.train, len(exp.classes), TrainConfig(epochs=30))
    """

    def __init__(self, model: nn.Module, config: WAConfig = WAConfig()) -> None:
        if not isinstance(getattr(model, "head", None), ExpandableHead):
            raise WeightlabError(
                "ClassIncrementalLearner needs model.head to be an ExpandableHead "
                f"(got {type(getattr(model, 'head', None)).__name__})"
            )
        self.model, self.config = model, config
        selector = HerdingSelector(model) if config.selection == "herding" else None
        self.memory = ReplayBuffer(config.memory, per_class=config.memory_per_class, selector=selector)

    @property
    def num_classes(self) -> int:
        return self.model.head.num_classes  # type: ignore[union-attr]

    def learn(self, data: ArrayDataset, n_new: int, train_config: TrainConfig) -> StepRecord:
        """One incremental step on ``data`` (its ``n_new`` classes are the next labels)."""
        n_old = self.num_classes
        if len(data) and (int(data.y.min()) < n_old or int(data.y.max()) >= n_old + n_new):
            raise WeightlabError(
                f"step labels must be the new classes {n_old}..{n_old + n_new - 1}, got "
                f"{int(data.y.min())}..{int(data.y.max())}"
            )
        teacher = frozen_copy(self.model) if (self.config.kd and n_old > 0) else None
        head = expand_head(self.model, n_new)
        callbacks: list[Callback] = []
        if teacher is not None:
            callbacks.append(KnowledgeDistillation(teacher, n_old, self.config))
        if self.config.clip:
            callbacks.append(ClipHeadWeights(head))
        aligner = (
            AlignHead(head, n_old, self.config)
            if (self.config.align and n_old)
            else None
        )
        if aligner is not None:
            callbacks.append(aligner)
        pool = concat([data, self.memory.dataset()]) if len(self.memory) else data
        train(self.model, pool, train_config, callbacks=callbacks)
        record = StepRecord(n_old, self.num_classes)
        if aligner is not None:
            record.gamma, record.norms_before, record.norms_after = (
                aligner.gamma,
                aligner.norms_before,
                aligner.norms_after,
            )
        else:
            record.norms_before = record.norms_after = row_norms(head.weight).cpu()
        if self.config.uses_memory:
            self.memory.update(data, generator=torch.Generator().manual_seed(train_config.seed))
        return record

    def nme(self) -> NearestMeanClassifier:
        """iCaRL's nearest-mean-of-exemplars classifier on the current features and memory."""
        return NearestMeanClassifier.from_memory(self.model, self.memory.dataset(), self.num_classes)

    # resumable state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **self.memory.state_dict()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state` (the head is resized to the saved number of classes first)."""
        head: ExpandableHead = self.model.head  # type: ignore[assignment]
        saved = tensors["model.head.weight"].shape[0]
        if saved > head.num_classes:
            head.expand(saved - head.num_classes)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.memory.load_state_dict(tensors)
