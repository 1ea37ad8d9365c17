"""Adversarial examples, adversarial training and the AutoAttack evaluation shared by ``rift``, ``done`` and
``rws``."""

from weightlab.methods.adversarial.attacks import (
    PGD,
    AdversarialTraining,
    adversarial_dataset,
    adversarial_predict,
    check_images,
    eval_mode,
    fgsm,
    pgd,
    project,
    tail_metrics,
)
from weightlab.methods.adversarial.autoattack import AutoAttackConfig, AutoAttackResult, autoattack_evaluate

__all__ = [
    "AdversarialTraining",
    "AutoAttackConfig",
    "AutoAttackResult",
    "PGD",
    "adversarial_dataset",
    "adversarial_predict",
    "autoattack_evaluate",
    "check_images",
    "eval_mode",
    "fgsm",
    "pgd",
    "project",
    "tail_metrics",
]
