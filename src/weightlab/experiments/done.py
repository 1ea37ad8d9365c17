"""Experiment ``done``: doubly robust instance-reweighted adversarial training on Fashion-MNIST.

Plain PGD adversarial training (AT) against DONE (KL-DRO weights ``softmax(ℓ/r)`` per batch), the paper's
instance-reweighted baselines GAIRAT (weights from the PGD steps to misclassify) and MAIL (weights from the
probability margin), DONE's compositional variant (a running normaliser across batches, with the step
corrected for the drift of the weight sum), DONE with CID's log-barrier lower level and implicit gradient term
(full only: several Hessian-vector products per step) and a control that keeps DONE's weight distribution but
shuffles it over the batch, trained on a balanced and on a long-tailed (class-imbalanced) training split. Each
reweighting method has one hyper-parameter chosen per training split from a grid of the same size (DONE: r;
GAIRAT: λ; MAIL: β) on a balanced validation split (the best validation tail-30% PGD accuracy, on the first
seed); the DONE variants share DONE's r. Every arm of a seed starts from the same initial weights, sees the
same data and trains with the same attack, epochs and schedule.
Evaluation on the balanced test split (Fashion-MNIST: all 1,000 images of every class): clean accuracy and
PGD-10 robust accuracy (average, worst class, bottom 30% of classes = RA-Tail-30); AutoAttack (standard:
APGD-CE, APGD-T, FAB-T, Square) on a stratified subset, beside PGD on the same images.
Claims: DONE raises tail-30% robust accuracy over AT, over GAIRAT and over MAIL at a similar average (paired
by seed), by PGD and by AutoAttack.

More arms: add a name to ``Method``, a factory to ``ARMS`` and, if it is tuned, its grid to ``TUNED``.
"""

from __future__ import annotations

import dataclasses
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
from weightlab.methods.done.baselines import GAIRAT, MAIL, GAIRATConfig, MAILConfig
from weightlab.methods.done.dro import DONE, DONEConfig
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import paired
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy
from weightlab.utils import derive_seed, seed_everything

Method = Literal["AT", "DONE", "GAIRAT", "MAIL", "DONE (running normaliser)", "DONE (implicit)",
                 "shuffled-weight control"]
Baseline = Literal["AT", "GAIRAT", "MAIL"]  # what DONE is compared against in the claims
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
    gairat_lambda_grid: tuple[float, ...] = (-1.0, 0.0, 1.0)  # GAIRAT's λ is chosen on validation among these
    mail_beta_grid: tuple[float, ...] = (-2.0, -1.5, -1.0)  # MAIL's β (bias; the authors' −1.5), likewise
    mail_gamma: Positive = 1.0  # MAIL's slope γ (fixed; the authors' 1)
    gairat_burn_in: Annotated[float, Range(0, 1, hi_open=True)] = 0.5  # plain AT for this fraction first (60/120)
    mail_burn_in: Annotated[float, Range(0, 1, hi_open=True)] = 0.625  # likewise (the authors' 75/120)
    barrier: Positive = 1e-3  # DONE (implicit): the lower level's log-barrier coefficient μ (fixed)
    cg_steps: Count = 5  # DONE (implicit): conjugate-gradient steps (Hessian-vector products) per batch
    # quick: DONE and the paper's three comparisons — 58 trainings and 40 AutoAttack runs where the 2-arm quick
    # (≈ 15 min on 2 cores) had 26 and 20 (`--set methods=AT,DONE --set aa_methods=AT,DONE` is that one);
    # full adds the running normaliser, CID's implicit term and the control
    methods: tuple[Method, ...] = ("AT", "DONE", "GAIRAT", "MAIL")
    splits: tuple[Split, ...] = SPLITS
    aa_per_class: NonNegativeInt = 10  # AutoAttack on this many test images per class (0: none)
    aa_steps: Count = 100  # APGD-CE / APGD-T / FAB-T iterations (100: the standard AutoAttack)
    aa_queries: Count = 5000  # Square's queries (5,000: the standard AutoAttack)
    aa_methods: tuple[Method, ...] = ("AT", "DONE", "GAIRAT", "MAIL")

    def check(self) -> None:
        if not self.methods or not self.splits or not self.r_grid:
            raise WeightlabError("methods, splits and r_grid must each name at least one value")
        if not self.gairat_lambda_grid or not self.mail_beta_grid:
            raise WeightlabError("gairat_lambda_grid and mail_beta_grid must each name at least one value")
        check_image_size(self.data, self.image_size)


Arm = Callable[[DoneConfig, float, PGD], Callback]  # (config, chosen value, attack) → the training callback
ARMS: dict[str, Arm] = {
    "AT": lambda config, v, attack: AdversarialTraining(attack),
    "DONE": lambda config, r, attack: DONE(attack, DONEConfig(r=r)),
    "GAIRAT": lambda config, lam, attack: GAIRAT(attack, GAIRATConfig(lam=lam, burn_in=config.gairat_burn_in)),
    "MAIL": lambda config, beta, attack: MAIL(
        attack, MAILConfig(gamma=config.mail_gamma, beta=beta, burn_in=config.mail_burn_in)),
    "DONE (running normaliser)": lambda config, r, attack: DONE(
        attack, DONEConfig(r=r, beta=config.beta, step_correction=True)),
    "DONE (implicit)": lambda config, r, attack: DONE(
        attack, DONEConfig(r=r, barrier=config.barrier, implicit=True, cg_steps=config.cg_steps)),
    "shuffled-weight control": lambda config, r, attack: DONE(attack, DONEConfig(r=r, shuffle=True)),
}
assert set(ARMS) == set(get_args(Method))
# the arms tuned on validation (name of the hyper-parameter, its grid); the other DONE variants use DONE's r
TUNED: dict[str, tuple[str, Callable[[DoneConfig], tuple[float, ...]]]] = {
    "DONE": ("r", lambda c: c.r_grid), "GAIRAT": ("λ", lambda c: c.gairat_lambda_grid),
    "MAIL": ("bias β", lambda c: c.mail_beta_grid)}


def tuned_by(method: str) -> str | None:
    """The tuned arm whose chosen value ``method`` uses (None: AT, nothing to tune)."""
    if method in TUNED:
        return method
    return "DONE" if method.startswith("DONE") or method == "shuffled-weight control" else None


def splits_for(config: DoneConfig, split: Split, seed: int) -> tuple[Any, Any, Any]:
    """Training split (balanced, or its long-tailed subset), balanced validation and test splits."""
    train_set, val_set, test_set = image_splits(config.data, config.image_size, n_train=config.n_train,
                                                n_val=config.n_val, n_test=config.n_test, seed=seed)
    if split == "imbalanced":
        train_set = imbalanced(train_set, config.imbalance, seed=seed)
    return train_set, val_set, test_set


def fit(config: DoneConfig, split: Split, method: str, value: float, seed: int) -> tuple[SmallCNN, dict[str, Any]]:
    """Train one model with arm ``method`` (its tuned hyper-parameter ``value``: r, λ or β) on ``split``;
    returns it and its training diagnostics."""
    train_set, _, _ = splits_for(config, split, seed)
    seed_everything(derive_seed(seed, "done", "init"))  # the same initial weights for every arm
    model = SmallCNN(10, width=config.width)
    attack = PGD(eps=config.eps, steps=config.at_steps, step_size=config.eps / 2)
    callback = ARMS[method](config, value, attack)
    state = train_adversarially(model, train_set, callback, epochs=config.at_epochs, batch_size=config.batch_size,
                                lr=config.lr, seed=derive_seed(seed, "done", split))
    diagnostics = {"train_clean": accuracy(model, train_set), "epoch_losses": state.epoch_losses,
                   "n_train": len(train_set)}
    if isinstance(callback, (DONE, GAIRAT, MAIL)):
        diagnostics.update(callback.diagnostics())
    return model, diagnostics


def eval_attack(config: DoneConfig) -> PGD:
    return PGD(eps=config.eps, steps=config.eval_steps, step_size=config.eps / 4)


def select(config: DoneConfig, split: Split, method: str, seed: int) -> dict[str, Any]:
    """Train the tuned arm ``method`` at every value of its grid on ``split`` and score it on the balanced
    validation split; the chosen value has the best validation tail-30% PGD accuracy (ties: the larger value,
    which for r, λ and β alike is the flatter weighting, closer to AT)."""
    _, val_set, _ = splits_for(config, split, seed)
    name, grid = TUNED[method]
    rows = []
    for value in grid(config):
        model, diag = fit(config, split, method, value, seed)
        val = robust_summary(model, val_set, eval_attack(config), seed=seed)
        rows.append({"value": value, "val_clean": val["clean"], "val_robust": val["robust"],
                     "val_tail30": val["robust_tail30"], "ess_fraction_median": diag.get("ess_fraction_median")})
    best = max(rows, key=lambda row: (row["val_tail30"], row["value"]))
    return {"name": name, "value": best["value"], "grid": rows}


def run_one(config: DoneConfig, split: Split, method: str, value: float, seed: int) -> dict[str, Any]:
    """Train one model and evaluate it on the balanced test split (PGD on all of it, AutoAttack on a subset)."""
    _, _, test_set = splits_for(config, split, seed)
    model, diag = fit(config, split, method, value, seed)
    out = {**robust_summary(model, test_set, eval_attack(config), seed=seed), "diagnostics": diag}
    if method in config.aa_methods and config.aa_per_class > 0:
        out["autoattack"] = autoattack_summary(model, test_set, eps=config.eps, per_class=config.aa_per_class,
                                               pgd=eval_attack(config), seed=seed, apgd_steps=config.aa_steps,
                                               fab_steps=config.aa_steps, square_queries=config.aa_queries)
    return out


def trial(config: DoneConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every (split, arm) of this seed, each a resumable unit; r, λ and β come from the first seed's selection."""
    first = ctx.for_seed(config.seed)
    tuned = [m for m in TUNED if m in {tuned_by(a) for a in config.methods}]
    chosen = {d: {m: first.cached(f"select/{d}/{m}", lambda d=d, m=m: select(config, d, m, config.seed))
                  for m in tuned} for d in config.splits}

    def value(d: str, m: str) -> float:
        by = tuned_by(m)
        return chosen[d][by]["value"] if by is not None else math.nan

    return {"select": chosen,
            "runs": {d: {m: ctx.cached(f"{d}/{m}", lambda d=d, m=m: run_one(config, d, m, value(d, m), seed))
                         for m in config.methods} for d in config.splits}}


PAPER = {"AT": "higher RA-Tail-30 and average RA than AT (CIFAR10, imbalanced CIFAR10)",
         "GAIRAT": "higher RA-Tail-30 and average RA than GAIRAT (CIFAR10, imbalanced CIFAR10)",
         "MAIL": "higher RA-Tail-30 and average RA than MAIL (CIFAR10, imbalanced CIFAR10)"}


def done_claims(config: DoneConfig, records: list[dict[str, Any]], d: str, base: str) -> list[Any]:
    """DONE against ``base`` on training split ``d``: tail-30% up at an average within 2 points, by PGD and
    (where both arms have it) by AutoAttack; paired by seed."""
    def col(m: str, key: str, part: str | None = None) -> list[float]:
        return [(r["runs"][d][m][part] if part else r["runs"][d][m])[key] for r in records]

    tail = paired(f"tail30(DONE) − tail30({base})", col("DONE", "robust_tail30"), col(base, "robust_tail30"))
    average = paired(f"avg(DONE) − avg({base})", col("DONE", "robust"), col(base, "robust"),
                     side=">=", threshold=-0.02)
    worst = np.subtract(col("DONE", "robust_worst"), col(base, "robust_worst"))
    out = [claim(f"{d}: DONE raises tail-30% PGD robust accuracy over {base} at a similar average "
                 "(average within 2 points)", tail, average,
                 measured={"Δtail30": tail.mean, "Δworst": float(np.mean(worst)), "Δaverage": average.mean},
                 paper=PAPER[base])]
    first = records[0]["runs"][d]
    if "autoattack" in first["DONE"] and "autoattack" in first[base]:
        tails = col("DONE", "robust_tail30", "autoattack"), col(base, "robust_tail30", "autoattack")
        aa_tail = paired(f"AA tail30(DONE) − AA tail30({base})", *tails)
        if at_floor(*tails):  # both arms score 0 on every seed: no resolution
            aa_tail = dataclasses.replace(aa_tail, ci95=None)  # inconclusive; floor_notes says why
        aa_avg = paired(f"AA avg(DONE) − AA avg({base})", col("DONE", "robust", "autoattack"),
                        col(base, "robust", "autoattack"), side=">=", threshold=-0.02)
        out.append(claim(f"{d}: the same against {base} under AutoAttack (tail-30% up, average within 2 points)",
                         aa_tail, aa_avg, paper=f"DONE's gains over {base} hold under AutoAttack (CIFAR10)"))
    return out


def summarise(config: DoneConfig, records: list[dict[str, Any]]) -> Results:
    def col(d: str, m: str, key: str, part: str | None = None) -> list[float]:
        return [(r["runs"][d][m][part] if part else r["runs"][d][m])[key] for r in records]

    def diag(d: str, m: str, key: str) -> list[float]:  # NaN (stored as null) where nothing was reweighted
        return [math.nan if (v := r["runs"][d][m]["diagnostics"][key]) is None else v for r in records]

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

        def weight_sums(m: str, key: str, d: str = d) -> str:  # GAIRAT's and MAIL's are normalised: 1
            return pm(diag(d, m, key), scale=1.0, digits=2) if key in first[d][m]["diagnostics"] else "1"

        tables[f"{d} training split, instance weights"] = [
            {"method": m, "parameter": records[0]["select"][d][tuned_by(m)]["name"],
             "value": records[0]["select"][d][tuned_by(m)]["value"],
             "median ESS / batch": pm(diag(d, m, "ess_fraction_median"), scale=1.0, digits=2),
             "weight sum min": weight_sums(m, "weight_sum_min"),
             "weight sum median": weight_sums(m, "weight_sum_median"),
             "weight sum max": weight_sums(m, "weight_sum_max")} for m in dro]
        tables[f"{d} training split, choice of each arm's hyper-parameter (validation, seed {config.seed})"] = [
            {"arm": m, "parameter": sel["name"], "value": row["value"], "val clean (%)": pm([row["val_clean"]]),
             "val PGD (%)": pm([row["val_robust"]]), "val PGD tail-30% (%)": pm([row["val_tail30"]]),
             "median ESS / batch": "" if row["ess_fraction_median"] is None else pm([row["ess_fraction_median"]],
                                                                                  scale=1.0, digits=2),
             "chosen": row["value"] == sel["value"]}
            for m, sel in records[0]["select"][d].items() for row in sel["grid"]]
    claims = []
    for d in config.splits:
        for base in get_args(Baseline):
            if {base, "DONE"} <= set(config.methods):
                claims.extend(done_claims(config, records, d, base))
    per_class = {f"{d} {m}": [float(np.mean(col(d, m, k))) for k in ("robust", "robust_tail30", "robust_worst")]
                 for d in config.splits for m in config.methods}
    figure = plots.curves(per_class, title="PGD robust accuracy: average, tail-30%, worst class",
                          xlabel="0 = average, 1 = tail-30%, 2 = worst class", ylabel="PGD accuracy")
    notes = [
        f"r is chosen per training split from {config.r_grid} on a balanced validation split "
        f"({config.n_val} images per class, disjoint from training) by the best validation tail-30% PGD "
        f"accuracy of DONE on seed {config.seed}, then used for every DONE arm and seed; never on test. "
        f"GAIRAT's λ (from {config.gairat_lambda_grid}) and MAIL's β (from {config.mail_beta_grid}) are chosen "
        "the same way, from grids of the same size, so every reweighting method gets the same search.",
        f"GAIRAT and MAIL run plain AT for the first {config.gairat_burn_in:.0%} / {config.mail_burn_in:.1%} of "
        f"the steps (their authors' burn-ins), then reweight; MAIL's slope γ = {config.mail_gamma} is fixed "
        "(the authors'); both normalise their weights per batch (MAIL's code scales them by 3 instead). "
        "Every arm has the same attack, epochs, batch size, learning rate and cosine schedule.",
        f"DONE (implicit): CID's log-barrier lower level (μ = {config.barrier}, fixed, not tuned; projected "
        f"PGD steps in the ball shrunk by 0.1%) and the implicit term (∂δ*/∂θ)ᵀ∂F/∂δ by {config.cg_steps} "
        "preconditioned conjugate-gradient steps on Hessian-vector products; each step adds 1 + cg_steps "
        "double-backward passes (benchmarks/done_implicit.py), so it is an arm of the full profile only, not of "
        "quick.",
        f"β = {config.beta} (running normaliser, with the step corrected by a running mean of the weight sums); "
        f"ε = {config.eps} ℓ∞ on [0, 1] images, PGD-{config.at_steps} training / PGD-{config.eval_steps} "
        f"evaluation; {config.n_train} training images per class, imbalance {config.imbalance}:1 (class 0 "
        f"largest); {config.data} at {config.image_size}×{config.image_size}.",
        f"AutoAttack: APGD-CE, APGD-T, FAB-T ({config.aa_steps} iterations each), Square ({config.aa_queries} "
        f"queries) from torchattacks at ε = {config.eps} on {config.aa_per_class} test images per class of "
        "every seed; PGD is rerun on the same images for a point-for-point comparison. Standard errors "
        "are binomial, √(p(1 − p)/n).",
        "ESS = (Σw)² / Σw² per batch, as a fraction of the batch (GAIRAT, MAIL: over the batches after the "
        "burn-in); the weight sums are before the step correction (the per-batch DONE, GAIRAT and MAIL weights "
        "sum to 1).",
    ]
    if any(math.isinf(r) for r in config.r_grid):
        notes.append("r = ∞ in the grid is plain AT.")
    notes.extend(floor_notes(config, records))
    return Results(tables=tables, claims=claims, notes=notes, figures={"robust_tail": figure})


def at_floor(*columns: list[float]) -> bool:
    """Whether every value of every per-seed column is 0 (accuracy at its floor: nothing to tell apart)."""
    return all(v == 0 for column in columns for v in column)


def floor_notes(config: DoneConfig, records: list[dict[str, Any]]) -> list[str]:
    """A diagnostic per training split where AutoAttack's tail-30% accuracy is 0 for every AutoAttack arm on
    every seed: the AutoAttack tail claims there sit at the floor and cannot show a difference, whatever the
    methods do (they are reported inconclusive)."""
    arms = [m for m in config.methods if m in config.aa_methods]
    if config.aa_per_class == 0 or not arms:
        return []
    return [f"{d}: floor — AutoAttack tail-30% accuracy is 0 for every method ({', '.join(arms)}) on every seed "
            f"({config.aa_per_class} test images per class), so the AutoAttack tail-30% claims on this split "
            "cannot show a difference and are reported inconclusive (a floor is not evidence against DONE); read "
            "the AutoAttack average and the PGD claims there."
            for d in config.splits
            if at_floor(*([r["runs"][d][m]["autoattack"]["robust_tail30"] for r in records] for m in arms))]


experiment("done", paper="done", config=DoneConfig, trial=trial, summarise=summarise,
           summary="DONE: KL-DRO instance-reweighted AT vs AT, GAIRAT and MAIL; tail-30% robust accuracy, PGD and AA",
           profiles={"smoke": {"seeds": 1, "data": "digits", "image_size": 8, "n_train": 100, "n_val": 20,
                               "width": 8, "at_epochs": 1, "eval_steps": 3,
                               "methods": ("AT", "DONE", "GAIRAT", "MAIL"), "r_grid": (1.0,),
                               "gairat_lambda_grid": (-1.0,), "mail_beta_grid": (-1.5,),
                               "splits": ("imbalanced",), "aa_per_class": 2,
                               "aa_steps": 5, "aa_queries": 50},
                     "full": {"seeds": 5, "image_size": 28, "n_train": 5000, "n_val": 500, "width": 32,
                              "at_epochs": 30, "at_steps": 7, "eval_steps": 20, "aa_per_class": 100,
                              "methods": ("AT", "DONE", "GAIRAT", "MAIL", "DONE (running normaliser)",
                                          "DONE (implicit)", "shuffled-weight control"),
                              "aa_methods": ("AT", "DONE", "GAIRAT", "MAIL", "DONE (implicit)"),
                              "r_grid": (0.25, 0.5, 1.0, 2.0, 4.0), "gairat_lambda_grid": (-2.0, -1.0, 0.0, 1.0, 2.0),
                              "mail_beta_grid": (-2.5, -2.0, -1.5, -1.0, -0.5)}})
