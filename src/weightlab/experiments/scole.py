"""Experiment ``scole``: knowledge accumulation over a long stream of short tasks with re-occurring classes.

Paper key ``scole`` (Lesort et al., CoLLAs 2023; spec/continual.md §2). 10 digit classes, 2 per task,
``n_tasks``
tasks of one epoch each (SGD lr 0.01, momentum 0, batch 64, gradient-norm clip 10, as the official defaults);
after every task the model is evaluated on the full test set of all 10 classes. Variants:

``sgd`` (plain) · ``sgd-mask`` (group masking) · ``adam-mask-reset`` / ``adam-mask-keep`` (Adam lr 1e-3 with
masking, optimizer reset per task or kept) · ``imbalanced-mask`` (class distribution with entropy decrease
``k``) · ``imbalanced-mask-freq-replay`` (the same with frequency replay) · ``forgetting-mask`` (after T/2
only
classes 0–4 occur, so classes 5–9 can decay).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
import torch

from weightlab.data import concat, digits
from weightlab.data.scenarios import SCoLeConfig, SCoLeStream, class_frequencies
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Count,
    Digits,
    DigitsSize,
    ExperimentConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
    Range,
)
from weightlab.experiments.results import Results, claim
from weightlab.methods.scole.strategies import FrequencyReplay, GroupMasking, TaskOptimizer
from weightlab.models import MLP
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import effect, paired
from weightlab.train import TrainConfig, per_class_accuracy, predict, train

VARIANTS: dict[str, dict] = {
    "sgd": {},
    "sgd-mask": {"mask": True},
    "adam-mask-reset": {"mask": True, "adam": True, "reset": True},
    "adam-mask-keep": {"mask": True, "adam": True, "reset": False},
    "imbalanced-mask": {"mask": True, "imbalanced": True},
    "imbalanced-mask-freq-replay": {"mask": True, "imbalanced": True, "replay": True},
    "forgetting-mask": {"mask": True, "forgetting": True},
}


Variant = Literal["sgd", "sgd-mask", "adam-mask-reset", "adam-mask-keep", "imbalanced-mask",
                  "imbalanced-mask-freq-replay", "forgetting-mask"]


@dataclass(frozen=True)
class SCoLeExperimentConfig(ExperimentConfig):
    data: Digits = "digits"
    n_tasks: Count = 200
    n_classes: Annotated[int, Range(2, 10)] = 10
    classes_per_task: Count = 2
    image_size: DigitsSize = 8
    augment_to: NonNegativeInt = 5748  # 4× digits by affine augmentation: ~460 training images per class; 0: none
    hidden: Count = 128
    epochs: Count = 1
    batch_size: Count = 64
    lr: Positive = 0.01
    adam_lr: Positive = 1e-3
    grad_clip: Positive = 10.0
    entropy_decrease: NonNegative = 5.0
    checkpoint_every: Count = 10  # tasks between checkpoints (a resumed run repeats at most 9 tasks)
    variants: tuple[Variant, ...] = tuple(VARIANTS)  # type: ignore[assignment]

    def check(self) -> None:
        for variant in self.variants:  # the generator checks its own settings (classes per task, ...)
            generator_config(self, variant, self.seed)


def generator_config(config: SCoLeExperimentConfig, variant: str, seed: int) -> SCoLeConfig:
    v = VARIANTS[variant]
    return SCoLeConfig(
        num_classes=config.n_classes,
        classes_per_task=config.classes_per_task,
        n_tasks=config.n_tasks,
        entropy_decrease=config.entropy_decrease if v.get("imbalanced") else 0.0,
        forgetting=bool(v.get("forgetting")),
        seed=seed,
    )


def run_variant(config: SCoLeExperimentConfig, ctx: TrialContext, data: tuple, variant: str) -> dict[str, Any]:
    """Per-task full-test accuracy and per-class accuracies, and the class frequencies of the stream
    (resumable every ``checkpoint_every`` tasks)."""
    v = VARIANTS[variant]
    stream = SCoLeStream(*data, generator_config(config, variant, ctx.seed))
    ctx.seeded(variant, "init")
    model = MLP(data[0].x[0].numel(), config.n_classes, hidden=(config.hidden, config.hidden))
    base = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, grad_clip=config.grad_clip,
                       optimizer="adam" if v.get("adam") else "sgd",
                       lr=config.adam_lr if v.get("adam") else config.lr, momentum=0.0, description=variant)
    optimizer = TaskOptimizer(model, base, reset=v.get("reset", True))
    callbacks = [GroupMasking()] if v.get("mask") else []
    memory = FrequencyReplay(config.n_classes, data[0].x.shape[1:]) if v.get("replay") else None
    objects: dict[str, Any] = {"model": model, "optimizer": optimizer}
    if memory is not None:
        objects["memory"] = memory

    def step(i: int, seed: int) -> dict[str, Any]:
        exp = stream[i]
        gen = torch.Generator().manual_seed(seed)
        replayed = memory.classes_to_replay(exp.classes) if memory is not None else []
        extra = memory.replay_data(replayed, generator=gen) if replayed else None
        train_data = concat([exp.train, extra]) if extra is not None else exp.train
        train(model, train_data, replace(base, seed=seed), callbacks=callbacks, optimizer=optimizer.get())
        if memory is not None:
            memory.observe(exp.train, exp.classes, replayed, generator=gen)
        logits, targets = predict(model, stream.full_test)
        per_class = per_class_accuracy(logits, targets, config.n_classes)
        return {"accuracy": round((logits.argmax(1) == targets).float().mean().item(), 6),
                "per_class": [round(x, 6) for x in per_class.tolist()]}

    rows = ctx.stream(variant, config.n_tasks, step, objects, every=config.checkpoint_every)
    return {"accuracy": [r["accuracy"] for r in rows], "per_class": [r["per_class"] for r in rows],
            "class_frequency": class_frequencies(stream.tasks, config.n_classes).tolist()}


def window(curve: np.ndarray, which: str) -> float:
    """Mean of the first or last 10% of a curve (at least one point)."""
    k = max(1, len(curve) // 10)
    return float(curve[:k].mean() if which == "first" else curve[-k:].mean())


def trial(config: SCoLeExperimentConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    data = (digits("train", size=config.image_size, augment_to=config.augment_to or None),
            digits("test", size=config.image_size))
    return {v: run_variant(config, ctx, data, v) for v in config.variants}


def summarise(config: SCoLeExperimentConfig, records: list[dict[str, Any]]) -> Results:
    acc = {v: np.asarray([r[v]["accuracy"] for r in records]) for v in config.variants}  # (seeds, tasks)
    # (seeds, tasks, classes)
    per_class = {v: np.asarray([r[v]["per_class"] for r in records]) for v in config.variants}
    freqs = {v: np.asarray([r[v]["class_frequency"] for r in records]) for v in config.variants}  # (seeds, classes)
    rows_out = []
    for variant in config.variants:
        a = acc[variant]
        rows_out.append(
            {
                "variant": variant,
                "first 10% of tasks (%)": pm([window(x, "first") for x in a]),
                "last 10% of tasks (%)": pm([window(x, "last") for x in a]),
                "final (%)": pm(a[:, -1]),
                "best (%)": pm(a.max(1)),
            }
        )
    claims, notes = [], []
    first = {v: [window(x, "first") for x in a] for v, a in acc.items()}  # per seed
    last = {v: [window(x, "last") for x in a] for v, a in acc.items()}
    for v in ("sgd", "sgd-mask"):
        if v in acc:
            claims.append(claim(f"{v}: full-test accuracy rises along the stream (knowledge accumulation)",
                                paired(f"last 10% − first 10% ({v})", last[v], first[v], threshold=0.05),
                                measured={"first 10%": float(np.mean(first[v])), "last 10%": float(np.mean(last[v]))},
                                paper="SCoLe abstract: accuracy improves with sparse re-occurrence"))
    if {"sgd", "sgd-mask"} <= set(acc):
        claims.append(claim("group masking ends higher than plain SGD",
                            paired("last 10%: sgd-mask − sgd", last["sgd-mask"], last["sgd"]),
                            measured={"sgd-mask": float(np.mean(last["sgd-mask"])), "sgd": float(np.mean(last["sgd"]))},
                            paper="SCoLe §strategies"))
    if {"adam-mask-reset", "adam-mask-keep"} <= set(acc):
        notes.append(f"Adam + masking, last 10%: optimizer reset {np.mean(last['adam-mask-reset']):.3f} vs kept "
                     f"{np.mean(last['adam-mask-keep']):.3f}.")
    half = config.n_tasks // 2
    if "forgetting-mask" in acc:
        absent = per_class["forgetting-mask"][:, :, config.n_classes // 2:].mean(2)  # (seeds, tasks)
        claims.append(claim("forgetting variant: classes that stop occurring after T/2 decay",
                            paired("acc(absent classes) at T − at T/2", absent[:, -1].tolist(),
                                   absent[:, half].tolist(), side="<"),
                            measured={"acc(absent classes) at T/2": float(absent[:, half].mean()),
                                      "at T": float(absent[:, -1].mean())},
                            paper="SCoLe --forgetting probe"))
    for v in ("imbalanced-mask", "imbalanced-mask-freq-replay"):
        if v in acc:
            k = max(1, config.n_tasks // 10)
            final_pc = np.nanmean(per_class[v][:, -k:], axis=1)  # (seeds, classes)
            corrs = [float(np.corrcoef(f, p)[0, 1]) for f, p in zip(freqs[v], final_pc, strict=True)]
            rare = float(np.mean([p[f <= 0.1].mean() for f, p in zip(freqs[v], final_pc, strict=True)
                                  if (f <= 0.1).any()]))
            notes.append(f"{v}: correlation of per-class accuracy (last 10%) with class frequency = "
                         f"{np.mean(corrs):.3f}; mean accuracy of classes with frequency ≤ 0.1 = {rare:.3f}.")
            if v == "imbalanced-mask":
                claims.append(claim("imbalanced stream: frequent classes are learned better",
                                    effect("corr(per-class acc, frequency)", corrs)))

    x = np.arange(1, config.n_tasks + 1)
    uniform = [v for v in ("sgd", "sgd-mask", "adam-mask-reset", "adam-mask-keep") if v in acc]
    figures = {"accuracy_along_stream": plots.curves(
        {v: acc[v].mean(0) for v in uniform}, x=x, band={v: acc[v].std(0) for v in uniform},
        title="full-test accuracy along the stream", xlabel="task", ylabel="accuracy")}
    if "forgetting-mask" in per_class:
        pc = per_class["forgetting-mask"].mean(0)
        fig = plots.curves(
            {
                "classes 0-4 (keep occurring)": pc[:, : config.n_classes // 2].mean(1),
                "classes 5-9 (absent after T/2)": pc[:, config.n_classes // 2 :].mean(1),
            },
            x=x,
            title="forgetting variant",
            xlabel="task",
            ylabel="accuracy",
        )
        fig.axes[0].axvline(half, color="k", ls="--", lw=1)
        figures["forgetting_variant"] = fig
    imb = [v for v in ("imbalanced-mask", "imbalanced-mask-freq-replay") if v in acc]
    if imb:
        fig, axes = plots.grid_of(1, ncols=1, size=4.5)
        k = max(1, config.n_tasks // 10)
        for v in imb:
            axes[0].scatter(freqs[v].ravel(), np.nanmean(per_class[v][:, -k:], axis=1).ravel(), label=v, s=14)
        axes[0].set(
            title="per-class accuracy (last 10% of tasks) vs class frequency",
            xlabel="fraction of tasks",
            ylabel="accuracy",
        )
        axes[0].legend(fontsize=8)
        figures["per_class_vs_frequency"] = fig
    notes.append("quick uses 200 tasks on 4× affine-augmented 8×8 digits; full uses 500.")
    notes.append("quick runs 3 seeds, not 5, to keep its cost (about 2 CPU-minutes); full runs 5.")
    return Results(tables={"SCoLe on digits (10 classes, 2 per task)": rows_out}, claims=claims, notes=notes,
                   figures=figures)


experiment("scole", paper="scole", config=SCoLeExperimentConfig, trial=trial, summarise=summarise,
           summary="SCoLe: knowledge accumulation over hundreds of short re-occurring tasks; group masking",
           profiles={"smoke": {"seeds": 1, "n_tasks": 20, "augment_to": 0,
                               "variants": ("sgd", "sgd-mask", "forgetting-mask")},
                     "full": {"seeds": 5, "n_tasks": 500, "image_size": 16, "hidden": 256, "augment_to": 14370}})
