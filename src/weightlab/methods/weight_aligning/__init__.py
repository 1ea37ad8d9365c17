"""Paper key ``weight-aligning``: Weight Aligning for class-incremental learning, as PyCIL runs it."""

from weightlab.methods.weight_aligning.aligning import (
    AlignHead,
    ClassIncrementalLearner,
    ClipHeadWeights,
    ICaRLLoss,
    KnowledgeDistillation,
    StepRecord,
    WAConfig,
    align_rows,
    expand_head,
    frozen_copy,
    icarl_loss,
    kd_loss,
    row_norms,
    weight_align,
)

__all__ = [
    "AlignHead",
    "ClassIncrementalLearner",
    "ClipHeadWeights",
    "ICaRLLoss",
    "KnowledgeDistillation",
    "StepRecord",
    "WAConfig",
    "align_rows",
    "expand_head",
    "frozen_copy",
    "icarl_loss",
    "kd_loss",
    "row_norms",
    "weight_align",
]
