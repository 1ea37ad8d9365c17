"""Experiment ``weight-aligning``: WA against its baselines on class-incremental split digits.

Paper key ``weight-aligning`` (Zhao et al., CVPR 2020; spec/continual.md §1, §7). Classes arrive in a seeded
order in ``steps`` equal groups; one MLP whose head grows by the new classes at each step. Methods (all on the
one training loop, data = new classes ∪ exemplar memory):

``finetune`` (no memory) · ``replay`` (random exemplars) · ``replay-herding`` (iCaRL herding) ·
``kd-replay`` (herding + KD, no aligning) · ``wa`` (herding + KD + weight aligning) · ``wa-clip`` (WA with
non-negative head weights). For every memory method the iCaRL nearest-mean-of-exemplars (NME) accuracy is
reported beside the CNN accuracy.

Metrics: average incremental accuracy ``Ā`` (mean over steps of the accuracy on all classes seen so far),
last-step accuracy, forgetting (max-based, Chaudhry et al.) over the per-step groups of classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from weightlab.data import ArrayDataset, class_incremental, class_order, concat, digits
from weightlab.data.local import load_cifar, load_mnist
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Count,
    DigitsSize,
    ExperimentConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
    Range,
)
from weightlab.experiments.results import Results, claim
from weightlab.methods.weight_aligning.aligning import ClassIncrementalLearner, WAConfig
from weightlab.models import MLP, ExpandableHead, resnet32_cifar
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import effect, paired
from weightlab.train import TrainConfig, accuracy, average_incremental_accuracy, forgetting

Method = Literal["finetune", "replay", "replay-herding", "kd-replay", "wa", "wa-clip"]
METHODS: tuple[Method, ...] = ("finetune", "replay", "replay-herding", "kd-replay", "wa", "wa-clip")
MEMORY_METHODS = METHODS[1:]


@dataclass(frozen=True)
class WeightAligningConfig(ExperimentConfig):
    increments: tuple[Annotated[int, Range(2)], ...] = (5, 10)  # one run per value: the classes in that many steps
    data: Literal["digits", "mnist", "cifar100"] = "digits"
    data_root: str = ""
    image_size: DigitsSize = 8
    augment_to: NonNegativeInt = 5748  # affine-augmented training set (4× digits): the memory is 4%, as in the paper
    hidden: Count = 128
    epochs: Count = 15
    batch_size: Count = 32
    lr: Positive = 0.1
    weight_decay: NonNegative = 2e-4
    schedule: Literal["constant", "cosine", "step"] = "step"  # PyCIL: ÷10 at milestones
    memory: NonNegativeInt = 230  # 4% of the training set, as 2000 of CIFAR-100's 50,000
    memory_per_class: NonNegativeInt = 0  # > 0: fixed memory per class instead of a fixed total
    methods: tuple[Method, ...] = METHODS

    def check(self) -> None:
        if self.data != "digits" and not self.data_root:
            raise WeightlabError(f"data {self.data!r} is read from a local folder: set data_root=PATH")
        if not self.increments or not self.methods:
            raise WeightlabError("increments and methods must not be empty")


def method_config(method: str, config: WeightAligningConfig) -> WAConfig:
    memory = 0 if method == "finetune" else config.memory
    per_class = config.memory_per_class or None if method != "finetune" else None
    return WAConfig(
        kd=method in ("kd-replay", "wa", "wa-clip"),
        align=method in ("wa", "wa-clip"),
        memory=memory,
        memory_per_class=per_class,
        selection="random" if method == "replay" else "herding",
        clip=method == "wa-clip",
    )


def load_data(config: WeightAligningConfig) -> tuple[ArrayDataset, ArrayDataset]:
    if config.data == "digits":
        train = digits("train", size=config.image_size, augment_to=config.augment_to or None, seed=0)
        return train, digits("test", size=config.image_size)
    if config.data == "mnist":
        return load_mnist(config.data_root, "train"), load_mnist(config.data_root, "test")
    return load_cifar(config.data_root, "train", classes=100), load_cifar(
        config.data_root, "test", classes=100
    )


def relabel(data: ArrayDataset, order: list[int]) -> ArrayDataset:
    """Labels renamed to their position in ``order`` (so each step's classes are the next labels)."""
    lookup = torch.empty(len(order), dtype=torch.long)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    return ArrayDataset(data.x, lookup[data.y])


def build_model(config: WeightAligningConfig, sample: ArrayDataset) -> torch.nn.Module:
    if config.data == "cifar100":
        model = resnet32_cifar(100, in_channels=sample.x.shape[1])
    else:
        model = MLP(sample.x[0].numel(), 10, hidden=(config.hidden, config.hidden))
    model.head = ExpandableHead(model.num_features)
    return model


def run_method(config: WeightAligningConfig, ctx: TrialContext, data: tuple[ArrayDataset, ArrayDataset],
               method: Method, steps: int) -> list[dict[str, Any]]:
    """One record per incremental step of ``method`` in ``steps`` steps (resumable after every step)."""
    order = class_order(len(data[0].classes), ctx.seed)
    stream = class_incremental(relabel(data[0], order), relabel(data[1], order), steps, order=range(len(order)),
                               seed=ctx.seed)
    ctx.seeded(method, steps, "init")
    learner = ClassIncrementalLearner(build_model(config, data[0]), method_config(method, config))

    def step(i: int, seed: int) -> dict[str, Any]:
        tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                         weight_decay=config.weight_decay, schedule=config.schedule, seed=seed,
                         description=f"{method} step {i}")
        record = learner.learn(stream[i].train, len(stream[i].classes), tc)
        seen = concat([e.test for e in stream[: i + 1]])
        return {"acc": accuracy(learner.model, seen),
                "nme": accuracy(learner.nme(), seen) if len(learner.memory) else float("nan"),
                "gamma": record.gamma,
                "accuracies": [accuracy(learner.model, e.test) if j <= i else 0.0 for j, e in enumerate(stream)],
                "norms_before": record.norms_before.tolist(), "norms_after": record.norms_after.tolist()}

    # step i is seeded from (seed, method, steps, i)
    return ctx.stream(f"{method}/{steps}", steps, step, {"learner": learner})


def series(rows: list[dict[str, Any]]) -> dict[str, list]:
    """The per-step records of :func:`run_method` as named series over the steps."""
    return {"acc": [r["acc"] for r in rows], "nme": [r["nme"] for r in rows], "gamma": [r["gamma"] for r in rows],
            "matrix": [r["accuracies"] for r in rows], "norms_before": [r["norms_before"] for r in rows],
            "norms_after": [r["norms_after"] for r in rows]}


def norm_ratio(norms: list[float], n_old: int) -> float:
    """Mean new-row norm / mean old-row norm."""
    return float(np.mean(norms[n_old:]) / np.mean(norms[:n_old]))


def per_seed_metrics(runs: list[dict[str, list]]) -> dict[str, list[float]]:
    per = len(runs[0]["norms_before"][0])  # classes per step
    out: dict[str, list[float]] = {
        "avg_inc": [],
        "last": [],
        "nme_avg_inc": [],
        "fgt": [],
        "ratio_before": [],
        "ratio_after": [],
    }
    for r in runs:
        out["avg_inc"].append(average_incremental_accuracy(r["acc"]))
        out["last"].append(r["acc"][-1])
        out["nme_avg_inc"].append(float(np.mean(r["nme"])))
        out["fgt"].append(forgetting(r["matrix"]))
        out["ratio_before"].append(
            float(np.mean([norm_ratio(n, per * (i + 1)) for i, n in enumerate(r["norms_before"][1:])]))
        )
        out["ratio_after"].append(
            float(np.mean([norm_ratio(n, per * (i + 1)) for i, n in enumerate(r["norms_after"][1:])]))
        )
    return out


def norms_figure(run: dict[str, list], steps: int, method: str):
    """The paper's figure: FC row norms of the last step before and after aligning (old vs new classes)."""
    before, after = np.asarray(run["norms_before"][-1]), np.asarray(run["norms_after"][-1])
    n_old = len(before) - len(before) // steps
    fig, axes = plots.grid_of(2, ncols=2, size=3.6)
    for ax, norms, title in zip(axes, (before, after), ("before aligning", "after aligning"), strict=True):
        colors = ["tab:blue" if c < n_old else "tab:orange" for c in range(len(norms))]
        ax.bar(range(len(norms)), norms, color=colors)
        ax.set(
            title=f"{title} (γ = {run['gamma'][-1]:.3f})",
            xlabel="class (blue old, orange new)",
            ylabel="‖W_c‖₂",
        )
    fig.suptitle(f"{method}: FC row norms after the last of {steps} steps", y=1.04)
    return fig


def trial(config: WeightAligningConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    data = load_data(config)
    return {f"{m}/steps{s}": run_method(config, ctx, data, m, s) for s in config.increments for m in config.methods}


def summarise(config: WeightAligningConfig, records: list[dict[str, Any]]) -> Results:
    seeds = config.seed_list
    runs = {(m, s): [series(r[f"{m}/steps{s}"]) for r in records] for s in config.increments for m in config.methods}
    stats = {key: per_seed_metrics(rs) for key, rs in runs.items()}
    rows = [
        {
            "steps": s,
            "method": m,
            "avg. incremental acc. (%)": pm(st["avg_inc"]),
            "last-step acc. (%)": pm(st["last"]),
            "forgetting (%)": pm(st["fgt"]),
            "NME avg. inc. acc. (%)": pm(st["nme_avg_inc"]) if m in MEMORY_METHODS else "–",
        }
        for (m, s), st in stats.items()
    ]
    paper = [
        {"method": "WA", "CIFAR-100 B0, 5 steps": 72.81, "10 steps": 69.46},
        {"method": "BiC", "CIFAR-100 B0, 5 steps": 73.10, "10 steps": 68.80},
        {"method": "iCaRL", "CIFAR-100 B0, 5 steps": 71.14, "10 steps": 65.27},
    ]

    claims, notes = [], []
    for s in config.increments:
        for wa in ("wa", "wa-clip"):
            ladder = (wa, "kd-replay", "replay-herding", "finetune")
            if all((m, s) in stats for m in ladder):
                claims.append(claim(f"{s} steps: {wa} > KD+replay > replay > finetune in avg. incremental accuracy",
                                    *(paired(f"Ā({a}) − Ā({b})", stats[(a, s)]["avg_inc"], stats[(b, s)]["avg_inc"])
                                      for a, b in zip(ladder, ladder[1:], strict=False)),
                                    measured={f"Ā({m})": float(np.mean(stats[(m, s)]["avg_inc"])) for m in ladder},
                                    paper="CIFAR-100 B0 (DER Table 1, unverified): WA 72.81 / 69.46 (5/10 steps)"))
        for wa in ("wa", "wa-clip"):
            if {(wa, s), ("kd-replay", s)} <= set(stats):
                claims.append(claim(f"{s} steps: aligning ({wa}) forgets less than KD+replay without aligning",
                                    paired(f"forgetting({wa}) − forgetting(kd-replay)", stats[(wa, s)]["fgt"],
                                           stats[("kd-replay", s)]["fgt"], side="<"),
                                    measured={f"forgetting({wa})": float(np.mean(stats[(wa, s)]["fgt"])),
                                              "forgetting(kd-replay)": float(np.mean(stats[("kd-replay", s)]["fgt"]))},
                                    paper="WA §3: the biased FC layer causes forgetting"))
            if (wa, s) in stats:
                before, after = stats[(wa, s)]["ratio_before"], stats[(wa, s)]["ratio_after"]
                claims.append(claim(f"{s} steps, {wa}: new-class FC norms exceed the old before aligning, match after",
                                    effect("new/old norm before aligning", before, threshold=1.0),
                                    effect("|new/old norm after aligning − 1|", [abs(a - 1.0) for a in after],
                                           side="<", threshold=0.01),
                                    measured={"new/old norm before": float(np.mean(before)),
                                              "new/old norm after": float(np.mean(after))},
                                    paper="WA Fig. 2 (norm bias)"))
    notes.append(
        "The replay rung of the ladder is replay with herding exemplars (the same memory as WA); random "
        "replay is listed beside it. 'After aligning' the mean norms are equal by construction of γ."
    )
    notes.append("Forgetting is the max-based variant (Chaudhry et al. 2018) over the per-step class groups.")

    first = config.increments[0]
    figures = {}
    for s in config.increments:
        curves = {m: np.mean([r["acc"] for r in runs[(m, s)]], axis=0).tolist() for m in config.methods}
        figures[f"accuracy_per_step_{s}"] = plots.curves(curves, title=f"{s} steps: accuracy on all seen classes",
                                                         xlabel="step", ylabel="accuracy")
        if "wa" in config.methods:
            figures[f"fc_norms_{s}"] = norms_figure(runs[("wa", s)][0], s, "wa")
        if "wa-clip" in config.methods:
            figures[f"fc_norms_clip_{s}"] = norms_figure(runs[("wa-clip", s)][0], s, "wa-clip")
    if "wa" in config.methods:
        notes.append(f"γ of WA per step (seed {seeds[0]}, {first} steps): "
                     + ", ".join(f"{g:.3f}" for g in runs[("wa", first)][0]["gamma"][1:]))
    notes.append("quick runs 3 seeds, not 5, to keep its cost (about 2.5 CPU-minutes); full runs 5.")
    return Results(tables={"Class-incremental split digits": rows, "Paper (CIFAR-100, for scale only)": paper},
                   claims=claims, notes=notes, figures=figures)


experiment("weight-aligning", paper="weight-aligning", config=WeightAligningConfig, trial=trial, summarise=summarise,
           summary="WA vs KD+replay vs replay vs finetune on class-incremental split digits (+ FC norm bias)",
           profiles={"smoke": {"seeds": 1, "increments": (5,), "epochs": 3, "augment_to": 0,
                               "methods": ("finetune", "wa")},
                     "full": {"seeds": 5, "epochs": 100, "image_size": 16, "hidden": 256, "increments": (5, 10)}})
