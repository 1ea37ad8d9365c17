"""Adversarial examples, adversarial training (PGD AT, TRADES, MART) and the AutoAttack evaluation shared by
``rift``, ``done`` and ``rws``."""

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
from weightlab.methods.adversarial.mart import MART, MARTConfig, margin_term, mart_loss
from weightlab.methods.adversarial.trades import TRADES, TRADESConfig, kl_per_sample, trades_attack, trades_loss

__all__ = [
    "AdversarialTraining",
    "AutoAttackConfig",
    "AutoAttackResult",
    "MART",
    "MARTConfig",
    "PGD",
    "TRADES",
    "TRADESConfig",
    "adversarial_dataset",
    "adversarial_predict",
    "autoattack_evaluate",
    "check_images",
    "eval_mode",
    "fgsm",
    "kl_per_sample",
    "margin_term",
    "mart_loss",
    "pgd",
    "project",
    "tail_metrics",
    "trades_attack",
    "trades_loss",
]
