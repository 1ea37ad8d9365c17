"""Adversarial examples and adversarial training shared by ``rift``, ``done`` and ``rws``."""

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

__all__ = [
    "AdversarialTraining",
    "PGD",
    "adversarial_dataset",
    "adversarial_predict",
    "check_images",
    "eval_mode",
    "fgsm",
    "pgd",
    "project",
    "tail_metrics",
]
