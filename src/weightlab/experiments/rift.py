"""Experiment ``rift``: robust critical fine-tuning of an adversarially trained CNN on digits.

Per seed: adversarial training (PGD, ℓ∞) of a small CNN on 8×8 digits; the MRC of every conv/linear module
on a fixed adversarial validation set; then three models on the test split — AT itself, fine-tuning all
layers on clean data (α = 1, and with the same interpolation search as RiFT), and RiFT (fine-tune the least
critical module, interpolate, pick α on validation). Columns: clean, corruption (mean over the 15 corruptions
at one severity) and PGD accuracy.
Claims: RiFT raises clean and corruption accuracy while PGD accuracy stays within 0.5 points of AT;
fine-tuning all layers loses robustness.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from weightlab.experiments._robust import (
    corrupted_sets,
    digit_splits,
    mean_accuracy,
    robust_summary,
    train_adversarially,
)
from weightlab.experiments.base import Claim, Results, experiment
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining, adversarial_dataset
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
from weightlab.runs import RunContext
from weightlab.train import TrainConfig
from weightlab.utils import derive_seed, seed_everything

METHODS = ("AT", "FT all (α=1)", "FT all + interpolation", "RiFT", "RiFT (convs only)")


@dataclass(frozen=True)
class RiftConfig:
    seed: int = 0
    seeds: int = 3
    image_size: int = 8
    width: int = 16
    eps: float = 0.2  # ℓ∞ radius on [0, 1] digits (8×8 digits need a larger ε than CIFAR's 8/255)
    at_epochs: int = 10
    at_steps: int = 3
    eval_steps: int = 10
    lr: float = 0.05
    batch_size: int = 64
    ft_epochs: int = 5
    ft_lr: float = 0.01
    mrc_epochs: int = 10
    radius: float = 0.1
    tolerance: float = 0.005  # robust accuracy (fraction) the α search may give up on validation
    corruptions: tuple[str, ...] = ()  # empty: all 15
    severity: int = 3
    alphas: tuple[float, ...] = DEFAULT_ALPHAS


def run_seed(config: RiftConfig, seed: int) -> dict:
    """Train AT, measure MRC, fine-tune and interpolate; the metrics of every model on the test split."""
    train_set, val_set, test_set = digit_splits(config.image_size, seed=seed)
    corrupted = corrupted_sets(test_set, config.corruptions, config.severity, seed=seed)
    seed_everything(derive_seed(seed, "rift", "init"))
    model = SmallCNN(10, width=config.width)
    train_attack = PGD(eps=config.eps, steps=config.at_steps, step_size=config.eps / 2)
    eval_attack = PGD(eps=config.eps, steps=config.eval_steps, step_size=config.eps / 4)
    train_adversarially(
        model,
        train_set,
        AdversarialTraining(train_attack),
        epochs=config.at_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=derive_seed(seed, "at"),
    )
    ft_config = TrainConfig(
        epochs=config.ft_epochs,
        batch_size=config.batch_size,
        lr=config.ft_lr,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="step",
        seed=derive_seed(seed, "ft"),
        description="FT",
    )
    adv_val = adversarial_dataset(model, val_set, eval_attack, seed=seed)
    rift_config = RiFTConfig(
        radius=config.radius,
        mrc_epochs=config.mrc_epochs,
        finetune=ft_config,
        tolerance=config.tolerance,
        alphas=config.alphas,
    )
    rift = RiFT(rift_config).fit(
        model, train_set, val_set, eval_attack, adversarial_data=adv_val, seed=seed
    )
    # the authors advise middle layers: the same search with the classifier left out of the candidates
    convs = tuple(m for m in weight_modules(model) if isinstance(model.get_submodule(m), torch.nn.Conv2d))
    rift_conv = RiFT(dataclasses.replace(rift_config, candidates=convs)).fit(
        model, train_set, val_set, eval_attack, adversarial_data=adv_val, seed=seed
    )
    ft_all = finetune(model, train_set, None, ft_config)
    ft_all_state = {k: v.clone() for k, v in ft_all.state_dict().items()}
    ft_interp = copy.deepcopy(ft_all)
    alpha_all, search_all = interpolation_search(
        ft_interp,
        model.state_dict(),
        ft_all_state,
        robust_evaluator(val_set, eval_attack, seed=seed),
        alphas=config.alphas,
        tolerance=config.tolerance,
    )

    def metrics(m: torch.nn.Module) -> dict[str, float]:
        out = robust_summary(m, test_set, eval_attack, seed=seed)
        return {"clean": out["clean"], "corruption": mean_accuracy(m, corrupted), "pgd": out["robust"]}

    return {
        "metrics": {
            "AT": metrics(model),
            "FT all (α=1)": metrics(ft_all),
            "FT all + interpolation": metrics(ft_interp),
            "RiFT": metrics(rift.model_),
            "RiFT (convs only)": metrics(rift_conv.model_),
        },
        "module_conv": rift_conv.module_,
        "alpha_conv": rift_conv.alpha_,
        "mrc": rift.mrc_,
        "module": rift.module_,
        "alpha": rift.alpha_,
        "alpha_ft_all": alpha_all,
        "search": rift.search_,
        "search_ft_all": search_all,
    }


@experiment(
    "rift",
    paper="rift",
    config=RiftConfig,
    summary="RiFT: fine-tune the least robust-critical module of an AT CNN, then interpolate",
    profiles={
        "smoke": {
            "seeds": 1,
            "width": 8,
            "at_epochs": 1,
            "ft_epochs": 1,
            "eval_steps": 3,
            "mrc_epochs": 2,
            "corruptions": ("gaussian_noise", "contrast"),
            "alphas": (0.0, 0.5, 1.0),
        },
        "full": {
            "seeds": 5,
            "image_size": 16,
            "width": 32,
            "at_epochs": 30,
            "at_steps": 7,
            "ft_epochs": 10,
            "eval_steps": 20,
        },
    },
)
def run(config: RiftConfig, ctx: RunContext) -> Results:
    seeds = [config.seed + k for k in range(config.seeds)]
    per_seed = [ctx.cached(f"seed{s}", lambda s=s: run_seed(config, s)) for s in seeds]

    def col(method: str, key: str) -> list[float]:
        return [r["metrics"][method][key] for r in per_seed]

    rows = [
        {
            "method": m,
            "clean (%)": pm(col(m, "clean")),
            "corruption (%)": pm(col(m, "corruption")),
            "PGD (%)": pm(col(m, "pgd")),
        }
        for m in METHODS
    ]
    rows.append(
        {
            "method": "paper R18/CIFAR10: AT → RiFT",
            "clean (%)": "81.46 → 83.44",
            "corruption (%)": "73.56 → 75.69",
            "PGD (%)": "53.63 → 53.65",
        }
    )
    modules = list(per_seed[0]["mrc"])
    mrc_rows = [
        {
            "module": name,
            "MRC (loss rise)": pm([r["mrc"][name] for r in per_seed], scale=1.0, digits=3),
            "chosen (seeds)": sum(r["module"] == name for r in per_seed),
        }
        for name in modules
    ]

    def mean_delta(method: str, key: str) -> float:
        return float(np.mean(np.subtract(col(method, key), col("AT", key))))

    d_clean, d_corr, d_pgd = (mean_delta("RiFT", k) for k in ("clean", "corruption", "pgd"))
    d_pgd_all = mean_delta("FT all (α=1)", "pgd")
    claims = [
        Claim(
            "RiFT raises clean and corruption accuracy while PGD accuracy stays within 0.5 points of AT",
            {"Δclean": d_clean, "Δcorruption": d_corr, "ΔPGD": d_pgd},
            d_clean > 0 and d_corr > 0 and d_pgd >= -0.005,
            paper="+1.98 / +2.13 / +0.02 pt (R18, CIFAR10)",
        ),
        Claim(
            "fine-tuning all layers on clean data loses robustness (PGD accuracy drops)",
            {"ΔPGD(FT all)": d_pgd_all, "ΔPGD(RiFT)": d_pgd},
            d_pgd_all < min(d_pgd, 0.0),
            paper="all layers: 52.66 vs RiFT 53.65 PGD",
        ),
    ]
    notes = [
        f"seed {s}: least critical module {r['module']!r}, α* = {r['alpha']:.1f}; least critical conv "
        f"{r['module_conv']!r}, α* = {r['alpha_conv']:.1f}; FT all: α* = {r['alpha_ft_all']:.1f}"
        for s, r in zip(seeds, per_seed, strict=True)
    ]
    notes.append(
        f"ε = {config.eps} (ℓ∞ on [0, 1]), PGD-{config.at_steps} for training, PGD-{config.eval_steps} "
        f"for evaluation; α is chosen on a validation split, never on the test split."
    )
    for key, name in (("search", "RiFT"), ("search_ft_all", "FT all")):
        alphas = [row["alpha"] for row in per_seed[0][key]]
        series = {
            f"{name} {m}": np.mean([[row[m] for row in r[key]] for r in per_seed], axis=0).tolist()
            for m in ("clean", "robust")
        }
        ctx.savefig(
            plots.curves(
                series,
                x=alphas,
                title=f"{name}: interpolation search (validation)",
                xlabel="α",
                ylabel="accuracy",
            ),
            f"interpolation_{name.replace(' ', '_')}",
        )
    ctx.savefig(
        plots.curves(
            {"MRC": [mean_std([r["mrc"][m] for r in per_seed])[0] for m in modules]},
            title="module robust criticality (x: module index in order)",
            xlabel="module",
            ylabel="robust loss rise",
        ),
        "mrc",
    )
    return Results(
        tables={
            "Clean / corruption / PGD accuracy (test split)": rows,
            "Module robust criticality": mrc_rows,
        },
        claims=claims,
        data={"per_seed": per_seed, "seeds": seeds},
        notes=notes,
    )
