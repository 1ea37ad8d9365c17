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

import numpy as np
import torch

from weightlab.data import concat, digits
from weightlab.data.scenarios import SCoLeConfig, SCoLeStream, class_frequencies
from weightlab.errors import WeightlabError
from weightlab.experiments.base import Claim, Results, experiment
from weightlab.methods.scole.strategies import FrequencyReplay, GroupMasking, TaskOptimizer
from weightlab.models import MLP
from weightlab.report import plots
from weightlab.report.tables import mean_std, pm
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, per_class_accuracy, predict, train
from weightlab.utils import derive_seed, seed_everything

VARIANTS: dict[str, dict] = {
    "sgd": {},
    "sgd-mask": {"mask": True},
    "adam-mask-reset": {"mask": True, "adam": True, "reset": True},
    "adam-mask-keep": {"mask": True, "adam": True, "reset": False},
    "imbalanced-mask": {"mask": True, "imbalanced": True},
    "imbalanced-mask-freq-replay": {"mask": True, "imbalanced": True, "replay": True},
    "forgetting-mask": {"mask": True, "forgetting": True},
}


@dataclass(frozen=True)
class SCoLeExperimentConfig:
    seed: int = 0
    seeds: int = 3
    n_tasks: int = 200
    num_classes: int = 10
    classes_per_task: int = 2
    image_size: int = 8
    augment_to: int = 5748  # 4× digits by affine augmentation: ~460 training images per class
    hidden: int = 128
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    adam_lr: float = 1e-3
    grad_clip: float = 10.0
    entropy_decrease: float = 5.0
    checkpoint_every: int = 10  # tasks between checkpoints (a resumed run repeats at most 9 tasks)
    variants: tuple[str, ...] = tuple(VARIANTS)

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise WeightlabError(f"checkpoint_every must be ≥ 1 task, got {self.checkpoint_every}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise WeightlabError(f"unknown scole variant(s) {bad}; expected some of {', '.join(VARIANTS)}")


def generator_config(config: SCoLeExperimentConfig, variant: str, seed: int) -> SCoLeConfig:
    v = VARIANTS[variant]
    return SCoLeConfig(
        num_classes=config.num_classes,
        classes_per_task=config.classes_per_task,
        n_tasks=config.n_tasks,
        entropy_decrease=config.entropy_decrease if v.get("imbalanced") else 0.0,
        forgetting=bool(v.get("forgetting")),
        seed=seed,
    )


def run_variant(
    config: SCoLeExperimentConfig, ctx: RunContext, data: tuple, variant: str, seed: int
) -> tuple[list[list[float]], SCoLeStream]:
    """Per-task rows ``[full-test accuracy, per-class accuracy × N]`` (resumable after every task)."""
    v = VARIANTS[variant]
    stream = SCoLeStream(*data, generator_config(config, variant, seed))
    seed_everything(derive_seed(seed, variant, "init"))
    model = MLP(data[0].x[0].numel(), config.num_classes, hidden=(config.hidden, config.hidden))
    base = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        grad_clip=config.grad_clip,
        optimizer="adam" if v.get("adam") else "sgd",
        lr=config.adam_lr if v.get("adam") else config.lr,
        momentum=0.0,
        description=variant,
    )
    optimizer = TaskOptimizer(model, base, reset=v.get("reset", True))
    callbacks = [GroupMasking()] if v.get("mask") else []
    memory = FrequencyReplay(config.num_classes, data[0].x.shape[1:]) if v.get("replay") else None

    def step(i: int) -> list[float]:
        exp = stream[i]
        task_seed = derive_seed(seed, variant, i)
        gen = torch.Generator().manual_seed(task_seed)
        replayed = memory.classes_to_replay(exp.classes) if memory is not None else []
        extra = memory.replay_data(replayed, generator=gen) if replayed else None
        train_data = concat([exp.train, extra]) if extra is not None else exp.train
        train(
            model, train_data, replace(base, seed=task_seed), callbacks=callbacks, optimizer=optimizer.get()
        )
        if memory is not None:
            memory.observe(exp.train, exp.classes, replayed, generator=gen)
        logits, targets = predict(model, stream.full_test)
        per_class = per_class_accuracy(logits, targets, config.num_classes)
        acc = (logits.argmax(1) == targets).float().mean()
        return [round(x, 6) for x in [acc.item(), *per_class.tolist()]]

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": t for k, t in model.state_dict().items()}
        out.update(optimizer.state_dict())
        return out | (memory.state_dict() if memory is not None else {})

    def load(tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict({k[6:]: t for k, t in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(tensors)
        if memory is not None:
            memory.load_state_dict(tensors)

    key, every = f"{variant}/seed{seed}", config.checkpoint_every
    rows = ctx.stream(key, config.n_tasks, step, state, load, every=every)
    return rows, stream


def window(curve: np.ndarray, which: str) -> float:
    """Mean of the first or last 10% of a curve (at least one point)."""
    k = max(1, len(curve) // 10)
    return float(curve[:k].mean() if which == "first" else curve[-k:].mean())


@experiment(
    "scole",
    paper="scole",
    config=SCoLeExperimentConfig,
    summary="SCoLe: knowledge accumulation over hundreds of short re-occurring tasks; group masking",
    profiles={
        "smoke": {
            "seeds": 1,
            "n_tasks": 20,
            "augment_to": 0,
            "variants": ("sgd", "sgd-mask", "forgetting-mask"),
        },
        "full": {"seeds": 5, "n_tasks": 500, "image_size": 16, "hidden": 256, "augment_to": 14370},
    },
)
def run(config: SCoLeExperimentConfig, ctx: RunContext) -> Results:
    data = (
        digits("train", size=config.image_size, augment_to=config.augment_to or None),
        digits("test", size=config.image_size),
    )
    seeds = [config.seed + k for k in range(config.seeds)]
    acc: dict[str, np.ndarray] = {}  # (seeds, tasks)
    per_class: dict[str, np.ndarray] = {}  # (seeds, tasks, classes)
    freqs: dict[str, np.ndarray] = {}  # (seeds, classes)
    for variant in config.variants:
        rows, streams = zip(*(run_variant(config, ctx, data, variant, s) for s in seeds), strict=True)
        table = np.asarray(rows, dtype=float)
        acc[variant], per_class[variant] = table[:, :, 0], table[:, :, 1:]
        freqs[variant] = np.stack([class_frequencies(st.tasks, config.num_classes).numpy() for st in streams])

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
    first = {v: mean_std([window(x, "first") for x in a])[0] for v, a in acc.items()}
    last = {v: mean_std([window(x, "last") for x in a])[0] for v, a in acc.items()}
    for v in ("sgd", "sgd-mask"):
        if v in acc:
            claims.append(
                Claim(
                    f"{v}: full-test accuracy rises along the stream (knowledge accumulation)",
                    {"first 10%": first[v], "last 10%": last[v]},
                    last[v] > first[v] + 0.05,
                    paper="SCoLe abstract: accuracy improves with sparse re-occurrence",
                )
            )
    if {"sgd", "sgd-mask"} <= set(acc):
        claims.append(
            Claim(
                "group masking ends higher than plain SGD",
                {"sgd-mask": last["sgd-mask"], "sgd": last["sgd"]},
                last["sgd-mask"] > last["sgd"],
                paper="SCoLe §strategies",
            )
        )
    if {"adam-mask-reset", "adam-mask-keep"} <= set(acc):
        notes.append(
            f"Adam + masking, last 10%: optimizer reset {last['adam-mask-reset']:.3f} vs kept "
            f"{last['adam-mask-keep']:.3f}."
        )
    half = config.n_tasks // 2
    if "forgetting-mask" in acc:
        absent = per_class["forgetting-mask"][:, :, config.num_classes // 2 :].mean(2)  # (seeds, tasks)
        at_half, at_end = float(absent[:, half].mean()), float(absent[:, -1].mean())
        claims.append(
            Claim(
                "forgetting variant: classes that stop occurring after T/2 decay",
                {"acc(absent classes) at T/2": at_half, "at T": at_end},
                at_end < at_half,
                paper="SCoLe --forgetting probe",
            )
        )
    for v in ("imbalanced-mask", "imbalanced-mask-freq-replay"):
        if v in acc:
            k = max(1, config.n_tasks // 10)
            final_pc = np.nanmean(per_class[v][:, -k:], axis=1)  # (seeds, classes)
            corr = float(np.mean([np.corrcoef(f, p)[0, 1] for f, p in zip(freqs[v], final_pc, strict=True)]))
            rare = float(
                np.mean([p[f <= 0.1].mean() for f, p in zip(freqs[v], final_pc, strict=True)
                         if (f <= 0.1).any()])
            )
            notes.append(
                f"{v}: correlation of per-class accuracy (last 10%) with class frequency = {corr:.3f}; "
                f"mean accuracy of classes with frequency ≤ 0.1 = {rare:.3f}."
            )
            if v == "imbalanced-mask":
                claims.append(
                    Claim(
                        "imbalanced stream: frequent classes are learned better",
                        {"corr(per-class acc, frequency)": corr},
                        corr > 0,
                    )
                )

    x = np.arange(1, config.n_tasks + 1)
    uniform = [v for v in ("sgd", "sgd-mask", "adam-mask-reset", "adam-mask-keep") if v in acc]
    ctx.savefig(
        plots.curves(
            {v: acc[v].mean(0) for v in uniform},
            x=x,
            band={v: acc[v].std(0) for v in uniform},
            title="full-test accuracy along the stream",
            xlabel="task",
            ylabel="accuracy",
        ),
        "accuracy_along_stream",
    )
    if "forgetting-mask" in per_class:
        pc = per_class["forgetting-mask"].mean(0)
        fig = plots.curves(
            {
                "classes 0-4 (keep occurring)": pc[:, : config.num_classes // 2].mean(1),
                "classes 5-9 (absent after T/2)": pc[:, config.num_classes // 2 :].mean(1),
            },
            x=x,
            title="forgetting variant",
            xlabel="task",
            ylabel="accuracy",
        )
        fig.axes[0].axvline(half, color="k", ls="--", lw=1)
        ctx.savefig(fig, "forgetting_variant")
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
        ctx.savefig(fig, "per_class_vs_frequency")
    notes.append(
        "quick uses 200 tasks (the issue's minimum) on 4× affine-augmented 8×8 digits; full uses 500."
    )
    return Results(
        tables={"SCoLe on digits (10 classes, 2 per task)": rows_out},
        claims=claims,
        notes=notes,
        data={
            "accuracy": {v: a.tolist() for v, a in acc.items()},
            "class_frequency": {v: f.tolist() for v, f in freqs.items()},
            "seeds": seeds,
        },
    )
