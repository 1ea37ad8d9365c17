"""Experiment ``done``: doubly robust instance-reweighted adversarial training on Fashion-MNIST.

Plain PGD adversarial training (AT) against DONE (KL-DRO weights ``softmax(ℓ/r)`` per batch), its
compositional variant (a running normaliser across batches, with the step corrected for the drift of the
weight sum) and a control that keeps DONE's weight distribution but shuffles it over the batch, trained on a
balanced and on a long-tailed (class-imbalanced) training split. ``r`` is chosen per training split on a
balanced validation split (the best validation tail-30% PGD accuracy, on the first seed) and used for every
DONE arm and seed. Every arm of a seed starts from the same initial weights and sees the same data.
Evaluation on the balanced test split (Fashion-MNIST: all 1,000 images of every class): clean accuracy and
PGD-10 robust accuracy (average, worst class, bottom 30% of classes = RA-Tail-30); AutoAttack (standard:
APGD-CE, APGD-T, FAB-T, Square) on a stratified subset, beside PGD on the same images.
Claim: DONE raises tail-30% robust accuracy over AT at a similar average (paired by seed), by PGD and by
AutoAttack.

More arms (issue 21: TRADES, MART, GAIRAT, MAIL): add a name to ``Method`` and a factory to ``ARMS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np

from weightlab.errors import WeightlabError
from weightlab.experiments._robust import (
    RobustData,
    autoattack_summary,
    check_image_size,
    image_splits,
    imbalanced,
    robust_summary,
    train_adversarially,
)
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, NonNegativeInt, Positive, Range
from weightlab.experiments.results import Results, claim
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.done.dro import DONE, DONEConfig
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import paired
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy
from weightlab.utils import derive_seed, seed_everything

Method = Literal["AT", "DONE", "DONE (running normaliser)", "shuffled-weight control"]
Split = Literal["balanced", "imbalanced"]
SPLITS: tuple[Split, ...] = ("balanced", "imbalanced")


@dataclass(frozen=True)
class DoneConfig(ExperimentConfig):
    seeds: Count = 5
    data: RobustData = "fashion-mnist"
    image_size: Count = 14
    n_train: Count = 300  # training images per class (balanced split; the long-tailed one is a subset)
    n_val: Count = 100  # validation images per class (balanced; for choosing r)
    n_test: Annotated[int, Range(1)] | None = None  # test images per class (None: the whole test split)
    width: Count = 16
    eps: Positive = 0.1  # ℓ∞ on [0, 1] images (the usual Fashion-MNIST radius)
    at_epochs: Count = 10
    at_steps: Count = 2
    eval_steps: Count = 10
    lr: Positive = 0.05
    batch_size: Count = 128
    r_grid: tuple[Positive, ...] = (0.5, 1.0, 2.0)  # r is chosen on validation among these
    beta: Annotated[float, Range(0, 1, lo_open=True)] = 0.1
    imbalance: Annotated[float, Range(1)] = 10.0  # largest / smallest class size of the long-tailed split
    # quick: the two arms of the claim (≈ 15 min on 2 cores); full adds the running normaliser and the control
    methods: tuple[Method, ...] = ("AT", "DONE")
    splits: tuple[Split, ...] = SPLITS
    aa_per_class: NonNegativeInt = 10  # AutoAttack on this many test images per class (0: none)
    aa_steps: Count = 100  # APGD-CE / APGD-T / FAB-T iterations (100: the standard AutoAttack)
    aa_queries: Count = 5000  # Square's queries (5,000: the standard AutoAttack)
    aa_methods: tuple[Method, ...] = ("AT", "DONE")

    def check(self) -> None:
        if not self.methods or not self.splits or not self.r_grid:
            raise WeightlabError("methods, splits and r_grid must each name at least one value")
        check_image_size(self.data, self.image_size)


Arm = Callable[[DoneConfig, float, PGD], Callback]  # (config, chosen r, training attack) → the training callback
ARMS: dict[str, Arm] = {
    "AT": lambda config, r, attack: AdversarialTraining(attack),
    "DONE": lambda config, r, attack: DONE(attack, DONEConfig(r=r)),
    "DONE (running normaliser)": lambda config, r, attack: DONE(
        attack, DONEConfig(r=r, beta=config.beta, step_correction=True)),
    "shuffled-weight control": lambda config, r, attack: DONE(attack, DONEConfig(r=r, shuffle=True)),
}
assert set(ARMS) == set(get_args(Method))


def splits_for(config: DoneConfig, split: Split, seed: int) -> tuple[Any, Any, Any]:
    """Training split (balanced, or its long-tailed subset), balanced validation and test splits."""
    train_set, val_set, test_set = image_splits(config.data, config.image_size, n_train=config.n_train,
                                                n_val=config.n_val, n_test=config.n_test, seed=seed)
    if split == "imbalanced":
        train_set = imbalanced(train_set, config.imbalance, seed=seed)
    return train_set, val_set, test_set


def fit(config: DoneConfig, split: Split, method: str, r: float, seed: int) -> tuple[SmallCNN, dict[str, Any]]:
    """Train one model with arm ``method`` on ``split``; returns it and its training diagnostics."""
    train_set, _, _ = splits_for(config, split, seed)
    seed_everything(derive_seed(seed, "done", "init"))  # the same initial weights for every arm
    model = SmallCNN(10, width=config.width)
    attack = PGD(eps=config.eps, steps=config.at_steps, step_size=config.eps / 2)
    callback = ARMS[method](config, r, attack)
    state = train_adversarially(model, train_set, callback, epochs=config.at_epochs, batch_size=config.batch_size,
                                lr=config.lr, seed=derive_seed(seed, "done", split))
    diagnostics = {"train_clean": accuracy(model, train_set), "epoch_losses": state.epoch_losses,
                   "n_train": len(train_set)}
    if isinstance(callback, DONE):
        diagnostics.update(callback.diagnostics())
    return model, diagnostics


def eval_attack(config: DoneConfig) -> PGD:
    return PGD(eps=config.eps, steps=config.eval_steps, step_size=config.eps / 4)


def select_r(config: DoneConfig, split: Split, seed: int) -> dict[str, Any]:
    """Train DONE at every r of the grid on ``split`` and score it on the balanced validation split; the
    chosen r has the best validation tail-30% PGD accuracy (ties: the larger r, closer to AT)."""
    _, val_set, _ = splits_for(config, split, seed)
    rows = []
    for r in config.r_grid:
        model, diag = fit(config, split, "DONE", r, seed)
        val = robust_summary(model, val_set, eval_attack(config), seed=seed)
        rows.append({"r": r, "val_clean": val["clean"], "val_robust": val["robust"],
                     "val_tail30": val["robust_tail30"], "ess_fraction_median": diag["ess_fraction_median"]})
    best = max(rows, key=lambda row: (row["val_tail30"], row["r"]))
    return {"r": best["r"], "grid": rows}


def run_one(config: DoneConfig, split: Split, method: str, r: float, seed: int) -> dict[str, Any]:
    """Train one model and evaluate it on the balanced test split (PGD on all of it, AutoAttack on a subset)."""
    _, _, test_set = splits_for(config, split, seed)
    model, diag = fit(config, split, method, r, seed)
    out = {**robust_summary(model, test_set, eval_attack(config), seed=seed), "diagnostics": diag}
    if method in config.aa_methods and config.aa_per_class > 0:
        out["autoattack"] = autoattack_summary(model, test_set, eps=config.eps, per_class=config.aa_per_class,
                                               pgd=eval_attack(config), seed=seed, apgd_steps=config.aa_steps,
                                               fab_steps=config.aa_steps, square_queries=config.aa_queries)
    return out


def trial(config: DoneConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every (split, arm) of this seed, each a resumable unit; r comes from the first seed's selection."""
    first = ctx.for_seed(config.seed)
    chosen = {d: first.cached(f"select_r/{d}", lambda d=d: select_r(config, d, config.seed)) for d in config.splits}
    return {"select_r": chosen,
            "runs": {d: {m: ctx.cached(f"{d}/{m}", lambda d=d, m=m: run_one(config, d, m, chosen[d]["r"], seed))
                         for m in config.methods} for d in config.splits}}


def summarise(config: DoneConfig, records: list[dict[str, Any]]) -> Results:
    def col(d: str, m: str, key: str, part: str | None = None) -> list[float]:
        return [(r["runs"][d][m][part] if part else r["runs"][d][m])[key] for r in records]

    def diag(d: str, m: str, key: str) -> list[float]:
        return [r["runs"][d][m]["diagnostics"][key] for r in records]

    first = records[0]["runs"]
    tables: dict[str, list[dict[str, Any]]] = {}
    for d in config.splits:
        tables[f"{d} training split, PGD-{config.eval_steps} on the balanced test split"] = [
            {"method": m, "clean (%)": pm(col(d, m, "clean")), "PGD avg (%)": pm(col(d, m, "robust")),
             "PGD worst class (%)": pm(col(d, m, "robust_worst")),
             "PGD tail-30% (%)": pm(col(d, m, "robust_tail30")),
             "n test": first[d][m]["n"], "binomial SE avg (pt)": pm(col(d, m, "robust_se"), digits=2),
             "train clean (%)": pm(diag(d, m, "train_clean")),
             "last epoch loss": pm([r["runs"][d][m]["diagnostics"]["epoch_losses"][-1] for r in records],
                                   scale=1.0, digits=3)}
            for m in config.methods]
        aa = [m for m in config.methods if "autoattack" in first[d][m]]
        if aa:
            tables[f"{d} training split, AutoAttack (standard) on a stratified test subset"] = [
                {"method": m, "n": first[d][m]["autoattack"]["n"],
                 "AA avg (%)": pm(col(d, m, "robust", "autoattack")),
                 "binomial SE (pt)": pm(col(d, m, "robust_se", "autoattack"), digits=2),
                 "AA worst class (%)": pm(col(d, m, "robust_worst", "autoattack")),
                 "AA tail-30% (%)": pm(col(d, m, "robust_tail30", "autoattack")),
                 "PGD same points (%)": pm(col(d, m, "pgd_same_points", "autoattack")),
                 "PGD-robust, AA broke": sum(col(d, m, "pgd_robust_aa_broken", "autoattack")),
                 **{f"broken by {k}": sum(r["runs"][d][m]["autoattack"]["broken_by"][k] for r in records)
                    for k in first[d][m]["autoattack"]["broken_by"]}}
                for m in aa]
            tables[f"{d} training split, per-class robust accuracy (%, seed mean): AutoAttack on the subset | "
                   "PGD on the whole test split"] = [
                {"method": m, **{f"class {k}": f"{a:.0f} | {p:.0f}" for k, (a, p) in enumerate(zip(
                    np.nanmean([r["runs"][d][m]["autoattack"]["per_class"] for r in records], axis=0) * 100,
                    np.nanmean([r["runs"][d][m]["per_class"] for r in records], axis=0) * 100, strict=True))}}
                for m in aa]
        dro = [m for m in config.methods if "ess_fraction_median" in first[d][m]["diagnostics"]]
        tables[f"{d} training split, DONE weights"] = [
            {"method": m, "r": records[0]["select_r"][d]["r"],
             "median ESS / batch": pm(diag(d, m, "ess_fraction_median"), scale=1.0, digits=2),
             "weight sum min": pm(diag(d, m, "weight_sum_min"), scale=1.0, digits=2),
             "weight sum median": pm(diag(d, m, "weight_sum_median"), scale=1.0, digits=2),
             "weight sum max": pm(diag(d, m, "weight_sum_max"), scale=1.0, digits=2)} for m in dro]
        tables[f"{d} training split, choice of r (validation, seed {config.seed})"] = [
            {"r": row["r"], "val clean (%)": pm([row["val_clean"]]), "val PGD (%)": pm([row["val_robust"]]),
             "val PGD tail-30% (%)": pm([row["val_tail30"]]),
             "median ESS / batch": pm([row["ess_fraction_median"]], scale=1.0, digits=2),
             "chosen": row["r"] == records[0]["select_r"][d]["r"]}
            for row in records[0]["select_r"][d]["grid"]]
    claims = []
    for d in config.splits:
        if not {"AT", "DONE"} <= set(config.methods):
            break
        tail = paired("tail30(DONE) − tail30(AT)", col(d, "DONE", "robust_tail30"), col(d, "AT", "robust_tail30"))
        average = paired("avg(DONE) − avg(AT)", col(d, "DONE", "robust"), col(d, "AT", "robust"),
                         side=">=", threshold=-0.02)
        worst = np.subtract(col(d, "DONE", "robust_worst"), col(d, "AT", "robust_worst"))
        claims.append(claim(f"{d}: DONE raises tail-30% PGD robust accuracy over AT at a similar average "
                            "(average within 2 points)", tail, average,
                            measured={"Δtail30": tail.mean, "Δworst": float(np.mean(worst)),
                                      "Δaverage": average.mean},
                            paper="higher RA-Tail-30 and average RA than AT (CIFAR10, imbalanced CIFAR10)"))
        if {"AT", "DONE"} <= {m for m in config.methods if "autoattack" in first[d][m]}:
            aa_tail = paired("AA tail30(DONE) − AA tail30(AT)", col(d, "DONE", "robust_tail30", "autoattack"),
                             col(d, "AT", "robust_tail30", "autoattack"))
            aa_avg = paired("AA avg(DONE) − AA avg(AT)", col(d, "DONE", "robust", "autoattack"),
                            col(d, "AT", "robust", "autoattack"), side=">=", threshold=-0.02)
            claims.append(claim(f"{d}: the same under AutoAttack (tail-30% up, average within 2 points)",
                                aa_tail, aa_avg, paper="DONE's gains hold under AutoAttack (CIFAR10)"))
    per_class = {f"{d} {m}": [float(np.mean(col(d, m, k))) for k in ("robust", "robust_tail30", "robust_worst")]
                 for d in config.splits for m in config.methods}
    figure = plots.curves(per_class, title="PGD robust accuracy: average, tail-30%, worst class",
                          xlabel="0 = average, 1 = tail-30%, 2 = worst class", ylabel="PGD accuracy")
    notes = [
        f"r is chosen per training split from {config.r_grid} on a balanced validation split "
        f"({config.n_val} images per class, disjoint from training) by the best validation tail-30% PGD "
        f"accuracy of DONE on seed {config.seed}, then used for every DONE arm and seed; never on test.",
        f"β = {config.beta} (running normaliser, with the step corrected by a running mean of the weight sums); "
        f"ε = {config.eps} ℓ∞ on [0, 1] images, PGD-{config.at_steps} training / PGD-{config.eval_steps} "
        f"evaluation; {config.n_train} training images per class, imbalance {config.imbalance}:1 (class 0 "
        f"largest); {config.data} at {config.image_size}×{config.image_size}.",
        f"AutoAttack: APGD-CE, APGD-T, FAB-T ({config.aa_steps} iterations each), Square ({config.aa_queries} "
        f"queries) from torchattacks at ε = {config.eps} on {config.aa_per_class} test images per class of "
        "every seed; PGD is rerun on the same images for a point-for-point comparison. Standard errors "
        "are binomial, √(p(1 − p)/n).",
        "ESS = (Σw)² / Σw² per batch, as a fraction of the batch; the weight sums are before the step "
        "correction (the per-batch DONE weights sum to 1).",
        "Not implemented: the log-barrier lower level and the implicit gradient term of CID.",
    ]
    if any(math.isinf(r) for r in config.r_grid):
        notes.append("r = ∞ in the grid is plain AT.")
    return Results(tables=tables, claims=claims, notes=notes, figures={"robust_tail": figure})


experiment("done", paper="done", config=DoneConfig, trial=trial, summarise=summarise,
           summary="DONE: KL-DRO instance-reweighted AT vs plain AT; tail-30% robust accuracy by PGD and AutoAttack",
           profiles={"smoke": {"seeds": 1, "data": "digits", "image_size": 8, "n_train": 100, "n_val": 20,
                               "width": 8, "at_epochs": 1, "eval_steps": 3, "methods": ("AT", "DONE"),
                               "r_grid": (1.0,), "splits": ("imbalanced",), "aa_per_class": 2,
                               "aa_steps": 5, "aa_queries": 50},
                     "full": {"seeds": 5, "image_size": 28, "n_train": 5000, "n_val": 500, "width": 32,
                              "at_epochs": 30, "at_steps": 7, "eval_steps": 20, "aa_per_class": 100,
                              "methods": ("AT", "DONE", "DONE (running normaliser)", "shuffled-weight control"),
                              "r_grid": (0.25, 0.5, 1.0, 2.0, 4.0)}})
