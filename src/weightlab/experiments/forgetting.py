"""Experiment ``forgetting`` (foundation): catastrophic forgetting on class-incremental splits of a dataset.

The classes of ``data`` (digits by default; any registered image dataset, e.g. ``data=fashion-mnist``) in
``n_tasks`` tasks, one MLP with a head over all classes. Three strategies: ``finetune`` (train on each task
in turn), ``replay`` (a class-balanced memory mixed into each batch) and ``joint`` (train on the union of all
tasks seen so far: the upper bound). Every strategy of a seed sees the same stream.
Claims: finetune forgets (forgetting > 0.3); joint ≥ replay ≥ finetune in average accuracy (paired by seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from weightlab.data import Experience, class_incremental, cumulative, load_dataset
from weightlab.data.datasets import dataset_spec
from weightlab.data.digits import SIZES
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, DatasetName, ExperimentConfig, NonNegativeInt, Positive
from weightlab.experiments.results import Results, claim
from weightlab.methods.continual.replay import Replay, ReplayBuffer
from weightlab.models import MLP
from weightlab.report import plots
from weightlab.report.claims import seeds_phrase
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import effect, paired
from weightlab.train import TrainConfig, accuracy_row, average_accuracy, backward_transfer, forgetting, train

Method = Literal["finetune", "replay", "joint"]
METHODS: tuple[Method, ...] = ("finetune", "replay", "joint")


@dataclass(frozen=True)
class ForgettingConfig(ExperimentConfig):
    seeds: Count = 5
    data: DatasetName = "digits"
    n_tasks: Count = 5
    image_size: Count = 8
    hidden: Count = 128
    epochs: Count = 5
    batch_size: Count = 32
    lr: Positive = 0.05
    memory: NonNegativeInt = 200
    methods: tuple[Method, ...] = METHODS

    def check(self) -> None:
        classes = dataset_spec(self.data).num_classes
        if not 2 <= self.n_tasks <= classes:
            raise WeightlabError(f"n_tasks must be in [2, {classes}] (the classes of {self.data}), got {self.n_tasks}")
        if self.data == "digits" and self.image_size not in SIZES:
            raise WeightlabError(f"image_size: digits come at sizes {', '.join(map(str, SIZES))}, "
                                 f"got {self.image_size}")
        if not self.methods:
            raise WeightlabError("methods must name at least one of " + ", ".join(METHODS))


def accuracy_matrix(config: ForgettingConfig, ctx: TrialContext, stream: list[Experience], method: Method,
                    n_inputs: int, n_classes: int) -> list[list[float]]:
    """The accuracy matrix of one strategy (a checkpoint of model and memory after every experience)."""
    ctx.seeded(method, "init")
    model = MLP(n_inputs, n_classes, hidden=(config.hidden, config.hidden))
    buffer = ReplayBuffer(config.memory)
    tests = [e.test for e in stream]

    def step(i: int, seed: int) -> list[float]:
        tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=seed,
                         description=f"{method} task {i}")
        data = cumulative(stream, i) if method == "joint" else stream[i].train
        callbacks = [Replay(buffer)] if method == "replay" else []
        train(model, data, tc, callbacks=callbacks, experience=stream[i])
        return accuracy_row(model, tests)

    return ctx.stream(method, config.n_tasks, step, {"model": model, "memory": buffer})


def trial(config: ForgettingConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every strategy's accuracy matrix on this seed's class order."""
    train_set = load_dataset(config.data, "train", size=config.image_size)
    test_set = load_dataset(config.data, "test", size=config.image_size)
    stream = class_incremental(train_set, test_set, config.n_tasks, seed=seed)
    n_inputs, n_classes = train_set.x[0].numel(), dataset_spec(config.data).num_classes
    return {"matrices": {m: accuracy_matrix(config, ctx, stream, m, n_inputs, n_classes) for m in config.methods}}


def summarise(config: ForgettingConfig, records: list[dict[str, Any]]) -> Results:
    matrices = {m: [r["matrices"][m] for r in records] for m in config.methods}
    acc = {m: [average_accuracy(R) for R in Rs] for m, Rs in matrices.items()}
    fgt = {m: [forgetting(R) for R in Rs] for m, Rs in matrices.items()}
    rows = [{"method": m, "average accuracy (%)": pm(acc[m]), "forgetting (%)": pm(fgt[m]),
             "BWT (%)": pm([backward_transfer(R) for R in Rs])} for m, Rs in matrices.items()]
    claims = []
    if "finetune" in config.methods:
        claims.append(claim("finetune forgets catastrophically (forgetting > 0.3)",
                            effect("forgetting(finetune)", fgt["finetune"], side=">", threshold=0.3)))
    if set(METHODS) <= set(config.methods):
        claims.append(claim("joint training is the upper bound and replay lies between finetune and joint",
                            paired("acc(joint) − acc(replay)", acc["joint"], acc["replay"], side=">="),
                            paired("acc(replay) − acc(finetune)", acc["replay"], acc["finetune"], side=">="),
                            measured={f"acc({m})": float(np.mean(acc[m])) for m in METHODS}))
    figures = {}
    for method, Rs in matrices.items():
        mean_R = np.mean(np.asarray(Rs), axis=0)
        figures[f"accuracy_matrix_{method}"] = plots.heatmap(
            mean_R, title=f"{method}: accuracy matrix ({seeds_phrase(len(Rs))})")
        per_task = {f"task {j}": mean_R[:, j].tolist() for j in range(mean_R.shape[1])}
        figures[f"per_task_{method}"] = plots.curves(per_task, title=f"{method}: accuracy of each task",
                                                     xlabel="after training task", ylabel="accuracy")
    return Results(tables={f"{config.data}, class-incremental in {config.n_tasks} tasks": rows}, claims=claims,
                   figures=figures)


experiment("forgetting", paper="foundation", config=ForgettingConfig, trial=trial, summarise=summarise,
           summary="finetune vs replay vs joint training on class-incremental splits (digits by default)",
           profiles={"smoke": {"seeds": 2, "epochs": 2, "n_tasks": 5},
                     "full": {"seeds": 5, "epochs": 20, "image_size": 16, "hidden": 256}})
