"""Experiment ``rift``: robust critical fine-tuning of adversarially trained CNNs on Fashion-MNIST.

Per seed and per adversarial-training base (PGD AT, TRADES, MART — the paper's Table 2; every base from the same
initialisation, batch order, attack budget and schedule): train a small CNN on Fashion-MNIST (balanced train /
validation splits drawn from the official training split); the MRC of every conv/linear module on a fixed
adversarial validation set; RiFT (fine-tune the least critical module on clean data, interpolate, pick α on
validation). On AT also: fine-tuning all layers on clean data (α = 1) and, with ``ablations``, the same
interpolation search for it and RiFT restricted to the convolutions. Columns on the test split: clean,
corruption (mean over the 15 corruptions at one severity, weightlab's corruptions as the out-of-distribution
sets) and PGD accuracy, and AutoAttack (APGD-CE, APGD-T, FAB-T, Square) beside PGD on a stratified test subset
for every base, its RiFT model and FT all. Claims (paired by seed, each RiFT model against its own base): RiFT
raises clean and corruption accuracy while PGD (and AutoAttack) accuracy stays within 0.5 points of the base;
fine-tuning all layers loses robustness.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from weightlab.errors import WeightlabError
from weightlab.experiments._robust import (
    RobustData,
    autoattack_summary,
    check_image_size,
    corrupted_sets,
    image_splits,
    mean_accuracy,
    robust_summary,
    train_adversarially,
)
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Corruption,
    Count,
    ExperimentConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
    Probability,
    Range,
    Severity,
)
from weightlab.experiments.results import Results, claim
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining, adversarial_dataset
from weightlab.methods.adversarial.mart import MART, MARTConfig
from weightlab.methods.adversarial.trades import TRADES, TRADESConfig
from weightlab.methods.rift.rift import (
    DEFAULT_ALPHAS,
    RiFT,
    RiFTConfig,
    finetune,
    interpolation_search,
    robust_evaluator,
    weight_modules,
)
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.tables import mean_std, pm
from weightlab.runs import TrialContext
from weightlab.stats import paired
from weightlab.train import Callback, TrainConfig, accuracy
from weightlab.utils import derive_seed

Base = Literal["AT", "TRADES", "MART"]
BASES: tuple[Base, ...] = ("AT", "TRADES", "MART")  # the paper's Table 2 bases weightlab has
ABLATIONS = ("FT all + interpolation", "RiFT (convs only)")  # AT only, with ``ablations``


def rift_name(base: str) -> str:
    """The arm of RiFT applied to ``base`` (plain "RiFT" on PGD AT, as in the paper's Table 1)."""
    return "RiFT" if base == "AT" else f"RiFT on {base}"


def methods(config: RiftConfig) -> tuple[str, ...]:
    """The evaluated models in table order: each base beside its RiFT model, then the AT-only arms."""
    arms = [name for base in config.bases for name in (base, rift_name(base))]
    return (*arms, "FT all (α=1)", *(ABLATIONS if config.ablations else ()))


@dataclass(frozen=True)
class RiftConfig(ExperimentConfig):
    seeds: Count = 5
    data: RobustData = "fashion-mnist"
    image_size: Count = 14
    n_train: Count = 300  # training images per class
    n_val: Count = 100  # validation images per class (α search, adversarial set for MRC)
    n_test: Annotated[int, Range(1)] | None = 300  # test images per class (None: all 1,000)
    width: Count = 16
    eps: Positive = 0.1  # ℓ∞ radius on [0, 1] images (the usual Fashion-MNIST radius)
    at_epochs: Count = 10
    at_steps: Count = 3
    eval_steps: Count = 10
    lr: Positive = 0.05
    batch_size: Count = 64
    finetune_epochs: Count = 5
    finetune_lr: Positive = 0.01
    mrc_epochs: Count = 10
    radius: Positive = 0.1
    tolerance: NonNegative = 0.005  # robust accuracy (fraction) the α search may give up on validation
    corruptions: tuple[Corruption, ...] = ()  # empty: all 15
    severity: Severity = 3
    alphas: tuple[Probability, ...] = DEFAULT_ALPHAS
    # adversarial-training bases RiFT is applied to; quick leaves MART and the AT ablations to smoke and full
    # (each base adds its training, MRC, α search and AutoAttack on two models — AutoAttack is most of the cost;
    # AT + TRADES without the ablations keeps quick near 1.5× its cost with AT alone)
    bases: tuple[Base, ...] = ("AT", "TRADES")
    trades_beta: NonNegative = 6.0  # TRADES's β (the paper's default)
    mart_lam: NonNegative = 6.0  # MART's λ (the paper's default)
    ablations: bool = False  # on AT: FT all + interpolation, RiFT restricted to the convolutions
    aa_per_class: NonNegativeInt = 10  # AutoAttack on this many test images per class (0: none)
    aa_steps: Count = 100  # APGD-CE / APGD-T / FAB-T iterations (100: the standard AutoAttack)
    aa_queries: Count = 5000  # Square's queries (5,000: the standard AutoAttack)

    def check(self) -> None:
        check_image_size(self.data, self.image_size)
        if "AT" not in self.bases or len(set(self.bases)) != len(self.bases):
            raise WeightlabError(f"bases must name AT once and each other base at most once, got {self.bases}")


def base_callback(base: str, attack: PGD, config: RiftConfig) -> Callback:
    """The adversarial-training callback of ``base``, all with the same attack budget."""
    if base == "TRADES":
        return TRADES(attack, TRADESConfig(beta=config.trades_beta))
    if base == "MART":
        return MART(attack, MARTConfig(lam=config.mart_lam))
    return AdversarialTraining(attack)


def trial(config: RiftConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Per base: train, measure MRC, fine-tune and interpolate; the metrics of every model on the test split."""
    train_set, val_set, test_set = image_splits(config.data, config.image_size, n_train=config.n_train,
                                                n_val=config.n_val, n_test=config.n_test, seed=seed)
    corrupted = corrupted_sets(test_set, config.corruptions, config.severity, seed=seed)
    train_attack = PGD(eps=config.eps, steps=config.at_steps, step_size=config.eps / 2)
    eval_attack = PGD(eps=config.eps, steps=config.eval_steps, step_size=config.eps / 4)
    ft_config = TrainConfig(epochs=config.finetune_epochs, batch_size=config.batch_size, lr=config.finetune_lr,
                            momentum=0.9, weight_decay=5e-4, schedule="step", seed=derive_seed(seed, "ft"),
                            description="FT")
    rift_config = RiFTConfig(radius=config.radius, mrc_epochs=config.mrc_epochs, finetune=ft_config,
                             tolerance=config.tolerance, alphas=config.alphas)
    models: dict[str, torch.nn.Module] = {}
    bases: dict[str, dict[str, Any]] = {}
    for base in config.bases:
        ctx.seeded("rift", "init")  # every base from the same initialisation and batch order (paired)
        model = SmallCNN(10, width=config.width)
        state = train_adversarially(model, train_set, base_callback(base, train_attack, config),
                                    epochs=config.at_epochs, batch_size=config.batch_size, lr=config.lr,
                                    seed=derive_seed(seed, "at"))
        adv_val = adversarial_dataset(model, val_set, eval_attack, seed=seed)
        rift = RiFT(rift_config).fit(model, train_set, val_set, eval_attack, adversarial_data=adv_val, seed=seed)
        models[base], models[rift_name(base)] = model, rift.model_
        bases[base] = {"mrc": rift.mrc_, "module": rift.module_, "alpha": rift.alpha_, "search": rift.search_,
                       "train_clean": accuracy(model, train_set), "epoch_losses": state.epoch_losses}
    at, extra = models["AT"], {}
    models["FT all (α=1)"] = ft_all = finetune(at, train_set, None, ft_config)
    if config.ablations:
        # the authors advise middle layers: the same search with the classifier left out of the candidates
        convs = tuple(m for m in weight_modules(at) if isinstance(at.get_submodule(m), torch.nn.Conv2d))
        rift_conv = RiFT(dataclasses.replace(rift_config, candidates=convs)).fit(
            at, train_set, val_set, eval_attack, mrc=bases["AT"]["mrc"], seed=seed)
        ft_interp = copy.deepcopy(ft_all)
        alpha_all, search_all = interpolation_search(
            ft_interp, at.state_dict(), {k: v.clone() for k, v in ft_all.state_dict().items()},
            robust_evaluator(val_set, eval_attack, seed=seed), alphas=config.alphas, tolerance=config.tolerance)
        models["FT all + interpolation"], models["RiFT (convs only)"] = ft_interp, rift_conv.model_
        extra = {"module_conv": rift_conv.module_, "alpha_conv": rift_conv.alpha_, "alpha_ft_all": alpha_all,
                 "search_ft_all": search_all}

    def metrics(m: torch.nn.Module, name: str) -> dict[str, Any]:
        out = robust_summary(m, test_set, eval_attack, seed=seed)
        row = {"clean": out["clean"], "corruption": mean_accuracy(m, corrupted), "pgd": out["robust"],
               "pgd_se": out["robust_se"], "n": out["n"], "pgd_worst": out["robust_worst"],
               "pgd_tail30": out["robust_tail30"]}
        if name not in ABLATIONS and config.aa_per_class > 0:
            row["autoattack"] = autoattack_summary(
                m, test_set, eps=config.eps, per_class=config.aa_per_class, pgd=eval_attack, seed=seed,
                apgd_steps=config.aa_steps, fab_steps=config.aa_steps, square_queries=config.aa_queries)
        return row

    return {"metrics": {name: metrics(m, name) for name, m in models.items()}, "bases": bases, **extra}


def _base_claims(base: str, col: Any, aa_col: Any, aa: list[str]) -> list[Any]:
    """RiFT on ``base`` against ``base``, paired by seed: clean and corruption up, PGD (and AA) within 0.5 pt."""
    arm = rift_name(base)

    def delta(key: str, **side: Any) -> Any:
        return paired(f"{key}({arm}) − {key}({base})", col(arm, key), col(base, key), **side)

    clean, corr, pgd = delta("clean"), delta("corruption"), delta("pgd", side=">=", threshold=-0.005)
    at = base == "AT"
    out = [claim(f"{'RiFT' if at else arm} raises clean and corruption accuracy while PGD accuracy stays within "
                 f"0.5 points of {base}", clean, corr, pgd,
                 measured={"Δclean": clean.mean, "Δcorruption": corr.mean, "ΔPGD": pgd.mean},
                 paper="+1.98 / +2.13 / +0.02 pt (R18, CIFAR10)" if at
                 else f"Table 2: RiFT on {base} raises std. and OOD accuracy, adv. accuracy kept")]
    if not at and {base, arm} <= set(aa):
        out.append(claim(f"under AutoAttack: {arm}'s robust accuracy stays within 0.5 points of {base}",
                         paired(f"AA({arm}) − AA({base})", aa_col(arm, "robust"), aa_col(base, "robust"),
                                side=">=", threshold=-0.005),
                         paper=f"Table 2 (RiFT on {base})"))
    return out


def summarise(config: RiftConfig, records: list[dict[str, Any]]) -> Results:
    def col(method: str, key: str) -> list[float]:
        return [r["metrics"][method][key] for r in records]

    rows = [{"method": m, "clean (%)": pm(col(m, "clean")), "corruption (%)": pm(col(m, "corruption")),
             "PGD (%)": pm(col(m, "pgd")), "PGD worst class (%)": pm(col(m, "pgd_worst")),
             "PGD tail-30% (%)": pm(col(m, "pgd_tail30")), "n test": records[0]["metrics"][m]["n"],
             "binomial SE (pt)": pm(col(m, "pgd_se"), digits=2)} for m in methods(config)]
    rows.append({"method": "paper R18/CIFAR10: AT → RiFT", "clean (%)": "81.46 → 83.44",
                 "corruption (%)": "73.56 → 75.69", "PGD (%)": "53.63 → 53.65"})
    aa = [m for m in methods(config) if "autoattack" in records[0]["metrics"][m]]

    def aa_col(method: str, key: str) -> list[float]:
        return [r["metrics"][method]["autoattack"][key] for r in records]

    aa_rows = [{"method": m, "n": records[0]["metrics"][m]["autoattack"]["n"], "AA (%)": pm(aa_col(m, "robust")),
                "binomial SE (pt)": pm(aa_col(m, "robust_se"), digits=2),
                "AA worst class (%)": pm(aa_col(m, "robust_worst")), "AA tail-30% (%)": pm(aa_col(m, "robust_tail30")),
                "PGD same points (%)": pm(aa_col(m, "pgd_same_points")),
                "PGD-robust, AA broke": sum(aa_col(m, "pgd_robust_aa_broken"))} for m in aa]
    modules = list(records[0]["bases"]["AT"]["mrc"])
    mrc_rows = [{"module": name, **{f"MRC {b} (loss rise)": pm([r["bases"][b]["mrc"][name] for r in records],
                                                                scale=1.0, digits=3) for b in config.bases},
                 **{f"chosen on {b} (seeds)": sum(r["bases"][b]["module"] == name for r in records)
                    for b in config.bases}} for name in modules]
    base_rows = [{"base": b, "train clean (%)": pm([r["bases"][b]["train_clean"] for r in records]),
                  "last epoch loss": pm([r["bases"][b]["epoch_losses"][-1] for r in records], scale=1.0, digits=3),
                  "α* (mean)": pm([r["bases"][b]["alpha"] for r in records], scale=1.0, digits=2)}
                 for b in config.bases]

    claims = _base_claims("AT", col, aa_col, aa)
    pgd_rift = float(np.mean(np.subtract(col("RiFT", "pgd"), col("AT", "pgd"))))
    claims.append(claim(
        "fine-tuning all layers on clean data loses robustness (PGD accuracy drops)",
        paired("pgd(FT all (α=1)) − pgd(AT)", col("FT all (α=1)", "pgd"), col("AT", "pgd"), side="<"),
        paired("pgd(FT all (α=1)) − pgd(RiFT)", col("FT all (α=1)", "pgd"), col("RiFT", "pgd"), side="<"),
        measured={"ΔPGD(FT all)": float(np.mean(np.subtract(col("FT all (α=1)", "pgd"), col("AT", "pgd")))),
                  "ΔPGD(RiFT)": pgd_rift},
        paper="all layers: 52.66 vs RiFT 53.65 PGD"))
    if {"AT", "RiFT", "FT all (α=1)"} <= set(aa):
        claims.append(claim(
            "under AutoAttack: RiFT's robust accuracy stays within 0.5 points of AT; FT all loses robustness",
            paired("AA(RiFT) − AA(AT)", aa_col("RiFT", "robust"), aa_col("AT", "robust"), side=">=",
                   threshold=-0.005),
            paired("AA(FT all (α=1)) − AA(AT)", aa_col("FT all (α=1)", "robust"), aa_col("AT", "robust"), side="<"),
            paper="RiFT evaluated by AutoAttack as well (CIFAR10)"))
    for base in config.bases:
        if base != "AT":
            claims.extend(_base_claims(base, col, aa_col, aa))
    missing = [b for b in BASES if b not in config.bases]
    notes = []
    for s, r in zip(config.seed_list, records, strict=True):
        chosen = "; ".join(f"{b}: {r['bases'][b]['module']!r}, α* = {r['bases'][b]['alpha']:.1f}"
                           for b in config.bases)
        if config.ablations:
            chosen += (f"; least critical conv on AT {r['module_conv']!r}, α* = {r['alpha_conv']:.1f}; FT all: "
                       f"α* = {r['alpha_ft_all']:.1f}")
        notes.append(f"seed {s}: least critical module per base — {chosen}")
    notes.append(f"ε = {config.eps} (ℓ∞ on [0, 1]), PGD-{config.at_steps} for training, PGD-{config.eval_steps} "
                 "for evaluation; α is chosen on a validation split, never on the test split.")
    notes.append(f"Bases ({', '.join(config.bases)}) share the initialisation, batch order, {config.at_epochs} "
                 f"epochs, schedule and the PGD-{config.at_steps} budget of the inner maximisation (TRADES: on the "
                 f"KL from a 0.001·N(0, 1) start, β = {config.trades_beta}; MART: PGD-CE, λ = {config.mart_lam}; "
                 "the papers' defaults, not tuned); RiFT's MRC, fine-tuning and α grid are the same on every base."
                 + (f" Not run in this profile: {', '.join(missing)} (the full profile runs every base)."
                    if missing else "")
                 + ("" if config.ablations else " The AT ablations (FT all + interpolation, RiFT on the convs "
                    "only) run with ablations=true (smoke, full)."))
    notes.append(f"{config.data} at {config.image_size}×{config.image_size}: {config.n_train} training and "
                 f"{config.n_val} validation images per class; corruptions at severity "
                 f"{config.severity}: {', '.join(config.corruptions) or 'all 15'}.")
    if aa:
        notes.append(f"AutoAttack: APGD-CE, APGD-T, FAB-T ({config.aa_steps} iterations each), Square "
                     f"({config.aa_queries} queries) from torchattacks at ε = {config.eps} on {config.aa_per_class} "
                     "test images per class of every seed; PGD rerun on the same images. Standard errors are "
                     "binomial, √(p(1 − p)/n).")
    figures = {}
    searches = [(f"search_{b}", rift_name(b), [r["bases"][b]["search"] for r in records]) for b in config.bases]
    if config.ablations:
        searches.append(("search_ft_all", "FT all", [r["search_ft_all"] for r in records]))
    for _, name, per_seed in searches:
        alphas = [row["alpha"] for row in per_seed[0]]
        series = {f"{name} {m}": np.mean([[row[m] for row in s] for s in per_seed], axis=0).tolist()
                  for m in ("clean", "robust")}
        figures[f"interpolation_{name.replace(' ', '_')}"] = plots.curves(
            series, x=alphas, title=f"{name}: interpolation search (validation)", xlabel="α", ylabel="accuracy")
    figures["mrc"] = plots.curves(
        {f"MRC {b}": [mean_std([r["bases"][b]["mrc"][m] for r in records])[0] for m in modules]
         for b in config.bases},
        title="module robust criticality (x: module index in order)", xlabel="module", ylabel="robust loss rise")
    return Results(tables={"Clean / corruption / PGD accuracy (test split)": rows,
                           "AutoAttack (standard) on a stratified test subset": aa_rows,
                           "Adversarial-training bases (convergence diagnostics)": base_rows,
                           "Module robust criticality": mrc_rows}, claims=claims, notes=notes, figures=figures)


experiment("rift", paper="rift", config=RiftConfig, trial=trial, summarise=summarise,
           summary="RiFT on AT / TRADES / MART CNNs: fine-tune the least robust-critical module, then interpolate",
           profiles={"smoke": {"seeds": 1, "data": "digits", "image_size": 8, "n_train": 100, "n_val": 20,
                               "n_test": None, "eps": 0.2, "width": 8, "at_epochs": 1, "finetune_epochs": 1,
                               "eval_steps": 3, "mrc_epochs": 2, "corruptions": ("gaussian_noise", "contrast"),
                               "alphas": (0.0, 0.5, 1.0), "aa_per_class": 2, "aa_steps": 5, "aa_queries": 50,
                               "bases": BASES, "ablations": True},
                     "full": {"seeds": 5, "image_size": 28, "n_train": 5000, "n_val": 500, "n_test": None,
                              "width": 32, "at_epochs": 30, "at_steps": 7, "finetune_epochs": 10, "eval_steps": 20,
                              "aa_per_class": 100, "bases": BASES, "ablations": True}})
