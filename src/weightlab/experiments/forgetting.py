"""Experiment ``forgetting`` (foundation): catastrophic forgetting on split digits.

Class-incremental split digits in ``n_tasks`` tasks, one MLP with a head over all classes. Three strategies:
``finetune`` (train on each task in turn), ``replay`` (a class-balanced memory mixed into each batch) and
``joint`` (train on the union of all tasks seen so far: the upper bound).
Claim: finetune forgets (forgetting > 0.3), joint is the upper bound, replay lies between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from weightlab.data import class_incremental, cumulative, digits
from weightlab.experiments.base import Claim, Results, experiment
from weightlab.methods.continual.replay import Replay, ReplayBuffer
from weightlab.models import MLP
from weightlab.report import plots
from weightlab.report.tables import mean_std, pm
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, accuracy_row, average_accuracy, backward_transfer, forgetting, train
from weightlab.utils import derive_seed, seed_everything

METHODS = ("finetune", "replay", "joint")


@dataclass(frozen=True)
class ForgettingConfig:
    seed: int = 0
    seeds: int = 3
    n_tasks: int = 5
    image_size: int = 8
    hidden: int = 128
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    memory: int = 200
    methods: tuple[str, ...] = METHODS


def run_method(config: ForgettingConfig, ctx: RunContext, method: str, seed: int) -> list[list[float]]:
    """The accuracy matrix of one strategy and seed (resumable after every experience)."""
    train_set, test_set = digits("train", size=config.image_size), digits("test", size=config.image_size)
    stream = class_incremental(train_set, test_set, config.n_tasks, seed=seed)
    seed_everything(derive_seed(seed, method, "init"))
    model = MLP(config.image_size**2, 10, hidden=(config.hidden, config.hidden))
    buffer = ReplayBuffer(config.memory)
    tests = [e.test for e in stream]

    def step(i: int) -> list[float]:
        exp_seed = derive_seed(seed, method, i)
        seed_everything(exp_seed)
        tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=exp_seed,
                         description=f"{method} task {i}")
        data = cumulative(stream, i) if method == "joint" else stream[i].train
        callbacks = [Replay(buffer)] if method == "replay" else []
        train(model, data, tc, callbacks=callbacks, experience=stream[i])
        return accuracy_row(model, tests)

    def state() -> dict[str, torch.Tensor]:
        return {**{f"model.{k}": v for k, v in model.state_dict().items()}, **buffer.state_dict()}

    def load(tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        buffer.load_state_dict(tensors)

    return ctx.stream(f"{method}/seed{seed}", config.n_tasks, step, state, load)


@experiment("forgetting", paper="foundation", config=ForgettingConfig,
            summary="finetune vs replay vs joint training on class-incremental split digits",
            profiles={"smoke": {"seeds": 1, "epochs": 2, "n_tasks": 5},
                      "full": {"seeds": 5, "epochs": 20, "image_size": 16, "hidden": 256}})
def run(config: ForgettingConfig, ctx: RunContext) -> Results:
    seeds = [config.seed + k for k in range(config.seeds)]
    matrices: dict[str, list[list[list[float]]]] = {m: [] for m in config.methods}
    for method in config.methods:
        for seed in seeds:
            matrices[method].append(run_method(config, ctx, method, seed))

    summary = {m: {"acc": [average_accuracy(R) for R in Rs], "fgt": [forgetting(R) for R in Rs],
                   "bwt": [backward_transfer(R) for R in Rs]} for m, Rs in matrices.items()}
    rows = [{"method": m, "average accuracy (%)": pm(s["acc"]), "forgetting (%)": pm(s["fgt"]),
             "BWT (%)": pm(s["bwt"])} for m, s in summary.items()]

    means = {m: {k: mean_std(v)[0] for k, v in s.items()} for m, s in summary.items()}
    claims = []
    if "finetune" in config.methods:
        fgt = means["finetune"]["fgt"]
        claims.append(Claim("finetune forgets catastrophically (forgetting > 0.3)",
                            {"forgetting(finetune)": fgt}, fgt > 0.3))
    if {"finetune", "replay", "joint"} <= set(config.methods):
        acc = {m: means[m]["acc"] for m in METHODS}
        claims.append(Claim("joint training is the upper bound and replay lies between finetune and joint",
                            {f"acc({m})": a for m, a in acc.items()},
                            acc["joint"] >= acc["replay"] >= acc["finetune"]))

    for method, Rs in matrices.items():
        mean_R = np.mean(np.asarray(Rs), axis=0)
        ctx.savefig(plots.heatmap(mean_R, title=f"{method}: accuracy matrix (mean over {len(Rs)} seeds)"),
                    f"accuracy_matrix_{method}")
        per_task = {f"task {j}": mean_R[:, j].tolist() for j in range(mean_R.shape[1])}
        ctx.savefig(plots.curves(per_task, title=f"{method}: accuracy of each task", xlabel="after training task",
                                 ylabel="accuracy"), f"per_task_{method}")
    return Results(tables={"Split digits, class-incremental": rows}, claims=claims,
                   data={"accuracy_matrices": matrices, "seeds": seeds})
