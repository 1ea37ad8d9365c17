"""Experiment ``weight-aligning``: WA against its baselines, class-incremental, over a memory sweep.

Paper key ``weight-aligning`` (Zhao et al., CVPR 2020; spec/continual.md §1, §7). Classes arrive in a seeded
order in ``steps`` equal groups; one MLP whose head grows by the new classes at each step (initialised as
PyCIL). Methods (all on the one training loop, data = new classes ∪ exemplar memory, the same epochs, lr and
schedule for every method):

``finetune`` (no memory) · ``lwf`` (KD, no memory: Learning without Forgetting) · ``replay`` (random
exemplars) · ``replay-herding`` (iCaRL herding) · ``kd-replay`` (herding + KD, no aligning) · ``icarl``
(herding + iCaRL's sigmoid-BCE loss with distillation targets; its classifier is the NME column) · ``wa``
(herding + KD + weight aligning) · ``wa-clip`` (WA with non-negative head weights). Every memory method runs
at each total memory of ``memories`` (exemplars, counted in images of the training set: with ``data=digits``
and ``augment_to`` they include affine copies). For every memory method the iCaRL nearest-mean-of-exemplars
(NME) accuracy is reported beside the CNN accuracy.

Metrics: average incremental accuracy ``Ā`` (mean over steps of the accuracy on all classes seen so far),
last-step accuracy, forgetting (max-based, Chaudhry et al.) over the per-step groups of classes. Diagnostics:
each step's final training loss and accuracy on its training pool, the loss drop over the last fifth of the
epochs (convergence), the new/old FC norm ratio before aligning and γ, the test-set size and binomial error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from weightlab.data import ArrayDataset, class_incremental, class_order, concat, digits, load_dataset
from weightlab.data.local import load_cifar, load_mnist
from weightlab.data.scenarios import per_class_subset
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Count,
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

Method = Literal["finetune", "lwf", "replay", "replay-herding", "kd-replay", "icarl", "wa", "wa-clip"]
METHODS: tuple[Method, ...] = ("finetune", "lwf", "replay", "replay-herding", "kd-replay", "icarl", "wa", "wa-clip")
NO_MEMORY: tuple[Method, ...] = ("finetune", "lwf")
MEMORY_METHODS = tuple(m for m in METHODS if m not in NO_MEMORY)
Data = Literal["digits", "fashion-mnist", "mnist-5k", "mnist", "cifar100"]
LOCAL = ("mnist", "cifar100")  # read from data_root


@dataclass(frozen=True)
class WeightAligningConfig(ExperimentConfig):
    """``quick`` (the defaults): Fashion-MNIST at 14×14, 500 training images per class, 5 and 10 steps,
    memories 20, 100, 500, 5 seeds; ``full``: 28×28, all images, memories 20–2000, every method; ``smoke``:
    digits."""

    seeds: Count = 5
    increments: tuple[Annotated[int, Range(2)], ...] = (5, 10)  # one run per value: the classes in that many steps
    data: Data = "fashion-mnist"
    data_root: str = ""
    image_size: Count = 14  # digits: 8, 16, 28 or 32; fashion-mnist / mnist-5k: any (resized)
    train_per_class: NonNegativeInt = 500  # > 0: a fixed seeded subset of this many training images per class
    augment_to: NonNegativeInt = 0  # digits only: affine-augmented training set (5748 = 4× digits)
    hidden: Count = 256
    epochs: Count = 30
    batch_size: Count = 64
    lr: Positive = 0.1
    weight_decay: NonNegative = 2e-4
    schedule: Literal["constant", "cosine", "step"] = "step"  # PyCIL: ÷10 at milestones
    memories: tuple[NonNegativeInt, ...] = (20, 100, 500)  # total exemplar memory; each memory method runs at each
    memory_per_class: NonNegativeInt = 0  # > 0: fixed memory per class instead of a fixed total
    methods: tuple[Method, ...] = ("finetune", "lwf", "replay-herding", "kd-replay", "wa")

    def check(self) -> None:
        if self.data in LOCAL and not self.data_root:
            raise WeightlabError(f"data {self.data!r} is read from a local folder: set data_root=PATH")
        if not self.increments or not self.methods or not self.memories:
            raise WeightlabError("increments, methods and memories must not be empty")
        if self.data == "digits" and self.image_size not in (8, 16, 28, 32):
            raise WeightlabError(f"image_size: digits come at sizes 8, 16, 28, 32, got {self.image_size}")


def run_keys(config: WeightAligningConfig) -> list[tuple[Method, int, int]]:
    """Every ``(method, steps, memory)`` run; the methods without memory run once per ``steps`` (memory 0)."""
    return [(m, s, 0 if m in NO_MEMORY else mem) for s in config.increments for m in config.methods
            for mem in (config.memories if m not in NO_MEMORY else (0,))]


def key_name(method: str, steps: int, memory: int) -> str:
    return f"{method}/steps{steps}" + (f"/mem{memory}" if method not in NO_MEMORY else "")


def method_config(method: str, config: WeightAligningConfig, memory: int) -> WAConfig:
    """``lwf`` is ``kd=True, memory=0``; ``finetune`` has neither; ``icarl`` trains with iCaRL's loss."""
    per_class = config.memory_per_class or None if method not in NO_MEMORY else None
    return WAConfig(
        kd=method in ("lwf", "kd-replay", "wa", "wa-clip"),
        align=method in ("wa", "wa-clip"),
        memory=0 if method in NO_MEMORY else memory,
        memory_per_class=per_class,
        selection="random" if method == "replay" else "herding",
        clip=method == "wa-clip",
        loss="icarl" if method == "icarl" else "ce",
    )


def load_data(config: WeightAligningConfig) -> tuple[ArrayDataset, ArrayDataset]:
    if config.data == "digits":
        train = digits("train", size=config.image_size, augment_to=config.augment_to or None, seed=0)
        test = digits("test", size=config.image_size)
    elif config.data == "mnist":
        train, test = load_mnist(config.data_root, "train"), load_mnist(config.data_root, "test")
    elif config.data == "cifar100":
        train = load_cifar(config.data_root, "train", classes=100)
        test = load_cifar(config.data_root, "test", classes=100)
    else:
        train = load_dataset(config.data, "train", size=config.image_size)
        test = load_dataset(config.data, "test", size=config.image_size)
    return per_class_subset(train, config.train_per_class, seed=0), test  # type: ignore[arg-type]


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
               method: Method, steps: int, memory: int) -> list[dict[str, Any]]:
    """One record per incremental step of ``method`` in ``steps`` steps at total ``memory`` (resumable after
    every step). Every method of a seed starts from the same initial weights and sees the same class order."""
    order = class_order(len(data[0].classes), ctx.seed)
    stream = class_incremental(relabel(data[0], order), relabel(data[1], order), steps, order=range(len(order)),
                               seed=ctx.seed)
    ctx.seeded(steps, "init")
    learner = ClassIncrementalLearner(build_model(config, data[0]), method_config(method, config, memory))

    def step(i: int, seed: int) -> dict[str, Any]:
        tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                         weight_decay=config.weight_decay, schedule=config.schedule, seed=seed,
                         description=f"{method} step {i}")
        record = learner.learn(stream[i].train, len(stream[i].classes), tc)
        seen = concat([e.test for e in stream[: i + 1]])
        return {"acc": accuracy(learner.model, seen),
                "val": accuracy(learner.model, concat([e.val for e in stream[: i + 1]])),
                "nme": accuracy(learner.nme(), seen) if len(learner.memory) else float("nan"),
                "gamma": record.gamma, "losses": record.epoch_losses, "train_acc": record.train_accuracy,
                "accuracies": [accuracy(learner.model, e.test) if j <= i else 0.0 for j, e in enumerate(stream)],
                "norms_before": record.norms_before.tolist(), "norms_after": record.norms_after.tolist()}

    # step i is seeded from (seed, key, i)
    return ctx.stream(key_name(method, steps, memory), steps, step, {"learner": learner})


def series(rows: list[dict[str, Any]]) -> dict[str, list]:
    """The per-step records of :func:`run_method` as named series over the steps."""
    return {k: [r[k] for r in rows] for k in ("acc", "val", "nme", "gamma", "losses", "train_acc",
                                              "norms_before", "norms_after")} | {"matrix": [r["accuracies"]
                                                                                            for r in rows]}


def norm_ratio(norms: list[float], n_old: int) -> float:
    """Mean new-row norm / mean old-row norm."""
    return float(np.mean(norms[n_old:]) / np.mean(norms[:n_old]))


def loss_drop(losses: list[float]) -> float:
    """Drop of the mean training loss over the last fifth of the epochs, ``L[-k-1] − L[-1]`` (at least one
    epoch; in loss units, so a loss already near 0 shows no drop; near 0: converged)."""
    k = max(1, len(losses) // 5)
    return float(losses[-k - 1] - losses[-1]) if len(losses) > k else 0.0


def per_seed_metrics(runs: list[dict[str, list]]) -> dict[str, list[float]]:
    per = len(runs[0]["norms_before"][0])  # classes per step
    out: dict[str, list[float]] = {k: [] for k in ("avg_inc", "last", "val_avg_inc", "nme_avg_inc", "fgt",
                                                   "ratio_before", "ratio_after", "final_loss", "train_acc",
                                                   "loss_drop")}
    for r in runs:
        out["avg_inc"].append(average_incremental_accuracy(r["acc"]))
        out["val_avg_inc"].append(average_incremental_accuracy(r["val"]))
        out["last"].append(r["acc"][-1])
        out["nme_avg_inc"].append(float(np.mean(r["nme"])))
        out["fgt"].append(forgetting(r["matrix"]))
        for name, norms in (("ratio_before", r["norms_before"]), ("ratio_after", r["norms_after"])):
            out[name].append(float(np.mean([norm_ratio(n, per * (i + 1)) for i, n in enumerate(norms[1:])])))
        out["final_loss"].append(float(np.mean([ls[-1] for ls in r["losses"]])))
        out["train_acc"].append(float(np.mean(r["train_acc"])))
        out["loss_drop"].append(float(np.max([loss_drop(ls) for ls in r["losses"]])))
    return out


def norms_figure(run: dict[str, list], steps: int, method: str):
    """The paper's figure: FC row norms of the last step before and after aligning (old vs new classes)."""
    before, after = np.asarray(run["norms_before"][-1]), np.asarray(run["norms_after"][-1])
    n_old = len(before) - len(before) // steps
    fig, axes = plots.grid_of(2, ncols=2, size=3.6)
    for ax, norms, title in zip(axes, (before, after), ("before aligning", "after aligning"), strict=True):
        colors = ["tab:blue" if c < n_old else "tab:orange" for c in range(len(norms))]
        ax.bar(range(len(norms)), norms, color=colors)
        ax.set(title=f"{title} (γ = {run['gamma'][-1]:.3f})", xlabel="class (blue old, orange new)",
               ylabel="‖W_c‖₂")
    fig.suptitle(f"{method}: FC row norms after the last of {steps} steps", y=1.04)
    return fig


def trial(config: WeightAligningConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    data = load_data(config)
    return {key_name(m, s, mem): run_method(config, ctx, data, m, s, mem) for m, s, mem in run_keys(config)}


def ladder_claims(config: WeightAligningConfig, stats: dict, s: int, mem: int) -> list:
    """The claims at ``s`` steps and memory ``mem``: the ladder, aligning forgets less, the norm bias."""
    def st(m: str) -> dict[str, list[float]] | None:
        return stats.get((m, s, 0 if m in NO_MEMORY else mem))

    out = []
    at = f"{s} steps, memory {mem}"
    for wa in ("wa", "wa-clip"):
        ladder = (wa, "kd-replay", "replay-herding", "finetune")
        if all(st(m) is not None for m in ladder):
            out.append(claim(f"{at}: {wa} > KD+replay > replay > finetune in avg. incremental accuracy",
                             *(paired(f"Ā({a}) − Ā({b})", st(a)["avg_inc"], st(b)["avg_inc"])
                               for a, b in zip(ladder, ladder[1:], strict=False)),
                             measured={f"Ā({m})": float(np.mean(st(m)["avg_inc"])) for m in ladder},
                             paper="CIFAR-100 B0 (DER Table 1, unverified): WA 72.81 / 69.46 (5/10 steps)"))
        if st(wa) is not None and st("kd-replay") is not None:
            out.append(claim(f"{at}: aligning ({wa}) forgets less than KD+replay without aligning",
                             paired(f"forgetting({wa}) − forgetting(kd-replay)", st(wa)["fgt"],
                                    st("kd-replay")["fgt"], side="<"),
                             measured={f"forgetting({wa})": float(np.mean(st(wa)["fgt"])),
                                       "forgetting(kd-replay)": float(np.mean(st("kd-replay")["fgt"]))},
                             paper="WA §3: the biased FC layer causes forgetting"))
        if st(wa) is not None:
            before, after = st(wa)["ratio_before"], st(wa)["ratio_after"]
            out.append(claim(f"{at}, {wa}: new-class FC norms exceed the old before aligning, match after",
                             effect("new/old norm before aligning", before, threshold=1.0),
                             effect("|new/old norm after aligning − 1|", [abs(a - 1.0) for a in after],
                                    side="<", threshold=0.01),
                             measured={"new/old norm before": float(np.mean(before)),
                                       "new/old norm after": float(np.mean(after))},
                             paper="WA Fig. 2 (norm bias)"))
    return out


def tables(stats: dict) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results table and the diagnostics table, one row per run key."""
    rows, diagnostics = [], []
    for (m, s, mem), st in stats.items():
        rows.append({"steps": s, "method": m, "memory": mem if m not in NO_MEMORY else "–",
                     "avg. incremental acc. (%)": pm(st["avg_inc"]), "last-step acc. (%)": pm(st["last"]),
                     "forgetting (%)": pm(st["fgt"]),
                     "NME avg. inc. acc. (%)": pm(st["nme_avg_inc"]) if m not in NO_MEMORY else "–"})
        diagnostics.append({"steps": s, "method": m, "memory": mem if m not in NO_MEMORY else "–",
                            "train acc. on pool, mean over steps (%)": pm(st["train_acc"]),
                            "final-epoch train loss": pm(st["final_loss"], scale=1.0, digits=3),
                            "max train-loss drop over last 1/5 of epochs": pm(st["loss_drop"], scale=1.0, digits=3),
                            "validation Ā (%)": pm(st["val_avg_inc"]),
                            "new/old norm before aligning": pm(st["ratio_before"], scale=1.0, digits=3)})
    return rows, diagnostics


def summarise(config: WeightAligningConfig, records: list[dict[str, Any]]) -> Results:
    seeds = config.seed_list
    runs = {k: [series(r[key_name(*k)]) for r in records] for k in run_keys(config)}
    stats = {k: per_seed_metrics(rs) for k, rs in runs.items()}
    rows, diagnostics = tables(stats)
    paper = [
        {"method": "WA", "CIFAR-100 B0, 5 steps": 72.81, "10 steps": 69.46},
        {"method": "BiC", "CIFAR-100 B0, 5 steps": 73.10, "10 steps": 68.80},
        {"method": "iCaRL", "CIFAR-100 B0, 5 steps": 71.14, "10 steps": 65.27},
    ]
    claims = [c for s in config.increments for mem in config.memories for c in ladder_claims(config, stats, s, mem)]
    n_test = len(load_data(config)[1]) if config.data in ("digits", "fashion-mnist", "mnist-5k") else 0
    notes = [
        "The replay rung of the ladder is replay with herding exemplars (the same memory as WA); random "
        "replay, where run, is listed beside it. 'After aligning' the mean norms are equal by construction of γ.",
        "Forgetting is the max-based variant (Chaudhry et al. 2018) over the per-step class groups.",
        f"Every method: {config.epochs} epochs per step, batch {config.batch_size}, SGD lr {config.lr} (momentum "
        f"0.9, weight decay {config.weight_decay}, '{config.schedule}' schedule), one shared initialisation per "
        "seed and number of steps. Convergence: the diagnostics table gives each run's training accuracy on its "
        "pool (new data ∪ memory), its final-epoch loss and the largest drop of the training loss over the "
        "last fifth of a step's epochs (in loss units; near 0: the step had converged).",
        f"Memory counts exemplars in images of the training set ({config.data}"
        + (f", {config.train_per_class} per class" if config.train_per_class else "")
        + (", augmented copies included" if config.data == "digits" and config.augment_to else "") + ").",
    ]
    if n_test:
        notes.append(f"Test set: n = {n_test} images over all classes (binomial standard error of an accuracy p: "
                     f"√(p(1−p)/n) ≤ {50 / np.sqrt(n_test):.2f} points); each step is tested on the seen classes.")
    figures = {}
    mid = config.memories[len(config.memories) // 2]
    for s in config.increments:
        curves = {m: np.mean([r["acc"] for r in runs[(m, s2, mem)]], axis=0).tolist()
                  for (m, s2, mem) in runs if s2 == s and mem in (0, mid)}
        figures[f"accuracy_per_step_{s}"] = plots.curves(curves, title=f"{s} steps, memory {mid}: accuracy on "
                                                         "all seen classes", xlabel="step", ylabel="accuracy")
        if len(config.memories) > 1:
            sweep = {m: [float(np.mean(stats[(m, s, mem)]["avg_inc"])) for mem in config.memories]
                     for m in config.methods if m not in NO_MEMORY}
            figures[f"memory_sweep_{s}"] = plots.curves(sweep, x=list(config.memories), title=f"{s} steps: Ā "
                                                        "against the memory", xlabel="exemplars", ylabel="Ā")
        for wa, stem in (("wa", "fc_norms"), ("wa-clip", "fc_norms_clip")):
            if wa in config.methods:
                figures[f"{stem}_{s}"] = norms_figure(runs[(wa, s, mid)][0], s, wa)
    if "wa" in config.methods:
        first = config.increments[0]
        notes.append(f"γ of WA per step (seed {seeds[0]}, {first} steps, memory {mid}): "
                     + ", ".join(f"{g:.3f}" for g in runs[("wa", first, mid)][0]["gamma"][1:]))
    return Results(tables={f"Class-incremental {config.data}": rows, "Diagnostics (convergence, norms)": diagnostics,
                           "Paper (CIFAR-100, for scale only)": paper},
                   claims=claims, notes=notes, figures=figures)


experiment("weight-aligning", paper="weight-aligning", config=WeightAligningConfig, trial=trial, summarise=summarise,
           summary="WA vs KD+replay vs replay vs LwF vs finetune, class-incremental, over a memory sweep "
                   "(+ FC norm bias)",
           profiles={"smoke": {"seeds": 1, "data": "digits", "image_size": 8, "train_per_class": 0, "hidden": 128,
                               "epochs": 3, "batch_size": 32, "increments": (5,), "memories": (230,),
                               "methods": ("finetune", "wa")},
                     "full": {"image_size": 28, "train_per_class": 0, "epochs": 60,
                              "memories": (20, 50, 100, 200, 500, 2000), "methods": METHODS}})
