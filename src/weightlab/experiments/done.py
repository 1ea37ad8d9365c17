"""Experiment ``done``: doubly robust instance-reweighted adversarial training on digits.

Plain PGD adversarial training against DONE (KL-DRO weights ``softmax(ℓ/r)`` per batch), its compositional
variant (a running normaliser across batches) and a control that keeps DONE's weight distribution but shuffles
it over the batch, on balanced digits and on a long-tailed (class-imbalanced) version of the training split.
Every method of a seed starts from the same initial weights. Metrics on the balanced test split: clean
accuracy, PGD robust accuracy (average, worst class, bottom 30% of classes = RA-Tail-30).
Claim: DONE raises worst-class robust accuracy over AT at a similar average (paired by seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np

from weightlab.experiments._robust import digit_splits, imbalanced, robust_summary, train_adversarially
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, Digits, DigitsSize, ExperimentConfig, Positive, Range
from weightlab.experiments.results import Results, claim
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.done.dro import DONE, DONEConfig
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import paired
from weightlab.train.callbacks import Callback
from weightlab.utils import derive_seed, seed_everything

Method = Literal["AT", "DONE", "DONE (running normaliser)", "shuffled-weight control"]
Split = Literal["balanced", "imbalanced"]
METHODS: tuple[Method, ...] = ("AT", "DONE", "DONE (running normaliser)", "shuffled-weight control")
SPLITS: tuple[Split, ...] = ("balanced", "imbalanced")


@dataclass(frozen=True)
class DoneConfig(ExperimentConfig):
    seeds: Count = 5
    data: Digits = "digits"
    image_size: DigitsSize = 8
    width: Count = 16
    eps: Positive = 0.1
    at_epochs: Count = 8
    at_steps: Count = 3
    eval_steps: Count = 10
    lr: Positive = 0.05
    batch_size: Count = 64
    r: Positive = 0.5
    beta: Annotated[float, Range(0, 1, lo_open=True)] = 0.1
    imbalance: Annotated[float, Range(1)] = 5.0  # largest / smallest class size of the long-tailed split
    methods: tuple[Method, ...] = METHODS
    splits: tuple[Split, ...] = SPLITS


def callback(config: DoneConfig, method: Method, attack: PGD) -> Callback:
    if method == "AT":
        return AdversarialTraining(attack)
    if method == "DONE":
        return DONE(attack, DONEConfig(r=config.r))
    if method == "DONE (running normaliser)":
        return DONE(attack, DONEConfig(r=config.r, beta=config.beta))
    return DONE(attack, DONEConfig(r=config.r, shuffle=True))


def run_one(config: DoneConfig, split: Split, method: Method, seed: int) -> dict[str, float]:
    """Train one model with ``method`` on ``split`` and evaluate it on the balanced test split."""
    train_set, _, test_set = digit_splits(config.image_size, val_fraction=0.0, seed=seed)
    if split == "imbalanced":
        train_set = imbalanced(train_set, config.imbalance, seed=seed)
    seed_everything(derive_seed(seed, "done", "init"))  # the same initial weights for every method
    model = SmallCNN(10, width=config.width)
    attack = PGD(eps=config.eps, steps=config.at_steps, step_size=config.eps / 2)
    train_adversarially(model, train_set, callback(config, method, attack), epochs=config.at_epochs,
                        batch_size=config.batch_size, lr=config.lr, seed=derive_seed(seed, "done", split))
    eval_attack = PGD(eps=config.eps, steps=config.eval_steps, step_size=config.eps / 4)
    return robust_summary(model, test_set, eval_attack, seed=seed)


def trial(config: DoneConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every (split, method) of this seed, each a resumable unit."""
    return {d: {m: ctx.cached(f"{d}/{m}", lambda d=d, m=m: run_one(config, d, m, seed)) for m in config.methods}
            for d in config.splits}


def summarise(config: DoneConfig, records: list[dict[str, Any]]) -> Results:
    def col(d: str, m: str, key: str) -> list[float]:
        return [r[d][m][key] for r in records]

    tables = {f"{d} training split (test: balanced)": [
        {"method": m, "clean (%)": pm(col(d, m, "clean")), "PGD avg (%)": pm(col(d, m, "robust")),
         "PGD worst class (%)": pm(col(d, m, "robust_worst")), "PGD tail-30% (%)": pm(col(d, m, "robust_tail30"))}
        for m in config.methods] for d in config.splits}
    claims = []
    if {"AT", "DONE"} <= set(config.methods):
        for d in config.splits:
            worst = paired("worst(DONE) − worst(AT)", col(d, "DONE", "robust_worst"), col(d, "AT", "robust_worst"))
            average = paired("avg(DONE) − avg(AT)", col(d, "DONE", "robust"), col(d, "AT", "robust"),
                             side=">=", threshold=-0.02)
            tail = np.subtract(col(d, "DONE", "robust_tail30"), col(d, "AT", "robust_tail30"))
            claims.append(claim(f"{d}: DONE raises worst-class robust accuracy over AT at a similar average "
                                "(average within 2 points)", worst, average,
                                measured={"Δworst": worst.mean, "Δtail30": float(np.mean(tail)),
                                          "Δaverage": average.mean},
                                paper="higher RA-Tail-30 and average RA than AT (CIFAR10, imbalanced CIFAR10)"))
    per_class = {f"{d} {m}": [float(np.mean(col(d, m, k))) for k in ("robust", "robust_tail30", "robust_worst")]
                 for d in config.splits for m in config.methods}
    figure = plots.curves(per_class, title="robust accuracy: average, tail-30%, worst class",
                          xlabel="0 = average, 1 = tail-30%, 2 = worst class", ylabel="PGD accuracy")
    notes = [
        f"r = {config.r}, β = {config.beta} (running normaliser), ε = {config.eps} ℓ∞, PGD-{config.at_steps} "
        f"training / PGD-{config.eval_steps} evaluation, imbalance {config.imbalance}:1 (class 0 largest).",
        "The shuffled-weight control keeps DONE's weight distribution but permutes it over the batch; "
        "DONE with r = ∞ is exactly uniform-weight AT (tested), so plain AT is the uniform control.",
        "Not implemented: the log-barrier lower level and the implicit gradient term of CID.",
    ]
    if math.isinf(config.r):
        notes.append("r = ∞: every DONE variant is plain AT.")
    return Results(tables=tables, claims=claims, notes=notes, figures={"robust_tail": figure})


experiment("done", paper="done", config=DoneConfig, trial=trial, summarise=summarise,
           summary="DONE: KL-DRO instance-reweighted AT vs plain AT; worst-class robust accuracy",
           profiles={"smoke": {"seeds": 1, "width": 8, "at_epochs": 1, "eval_steps": 3, "methods": ("AT", "DONE")},
                     "full": {"seeds": 5, "image_size": 16, "width": 32, "at_epochs": 30, "at_steps": 7,
                              "eval_steps": 20}})
