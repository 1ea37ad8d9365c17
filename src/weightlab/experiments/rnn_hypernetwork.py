"""Experiment ``rnn-hypernetwork``: continual learning with an RNN (LSTM) hypernetwork.

Two scenarios with task identity given at test time (CL1): split digits (task-incremental, 2 classes per
task) and permuted digits. The target network is an MLP; strategies:

* ``rnn-hnet``: the LSTM hypernetwork generating the target's weights chunk by chunk, output regulariser β;
* ``rnn-hnet-grow``: the same with Fisher-importance-weighted regulariser and LSTM growth at each new task
  (our reading of the paper's "novel regularisation and network growth");
* ``chunked-hnet``: von Oswald's chunked MLP hypernetwork with the output regulariser, and
  ``chunked-hnet-matched``: the same, widened to at least the LSTM hypernetwork's parameter count;
* ``ewc`` and ``finetune``: the target network trained directly (one head per task on split digits).

Claim: RNN hypernet ≥ chunked MLP hypernet > EWC > finetune in average accuracy after the last task, with
fewer trainable parameters than the target network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from weightlab.data import digits, domain_incremental, task_incremental
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Count,
    Digits,
    DigitsSize,
    ExperimentConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
)
from weightlab.experiments.results import Results, claim
from weightlab.experiments.variational_binary_cl import mean_heatmaps
from weightlab.methods.continual.ewc import EWC, EWCConfig
from weightlab.methods.hypernet.hypernetworks import (
    ChunkedMLPHyperNet,
    HnetRegConfig,
    HyperModel,
    HyperNetwork,
    LSTMHyperNet,
    OutputRegularizer,
    count_parameters,
)
from weightlab.models import MLP, MultiHead
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import Effect, Side, effect, paired
from weightlab.train import TrainConfig, accuracy_row, average_accuracy, forgetting, train
from weightlab.utils import derive_seed

Method = Literal["rnn-hnet", "rnn-hnet-grow", "chunked-hnet", "chunked-hnet-matched", "ewc", "finetune"]
Scenario = Literal["split", "permuted"]
METHODS: tuple[Method, ...] = ("rnn-hnet", "rnn-hnet-grow", "chunked-hnet", "chunked-hnet-matched", "ewc",
                               "finetune")
SCENARIOS: tuple[Scenario, ...] = ("split", "permuted")


@dataclass(frozen=True)
class RnnHypernetConfig(ExperimentConfig):
    data: Digits = "digits"
    n_tasks: Count = 5
    image_size: DigitsSize = 8
    hidden: Count = 64  # target MLP: in-64-64-out
    steps: Count = 250  # optimisation steps per task
    batch_size: Count = 32
    lr: Positive = 0.001
    beta: NonNegative = 0.01
    emb_dim: Count = 8
    chunk_emb_dim: Count = 8
    chunk_size: Count = 300
    hnet_hidden: Count = 16
    growth: NonNegativeInt = 2  # LSTM units added per new task by rnn-hnet-grow
    ewc_lambda: NonNegative = 100.0
    fisher_samples: Count = 256
    methods: tuple[Method, ...] = METHODS
    scenarios: tuple[Scenario, ...] = SCENARIOS

    def check(self) -> None:
        if self.n_tasks < 2 or 10 % self.n_tasks:
            raise WeightlabError(f"n_tasks must be ≥ 2 and divide the 10 classes, got {self.n_tasks}")


class HnetProgress:
    """What a hypernetwork run carries besides its weights, as a ``state_dict()``: the regulariser's
    importance of every finished task and how often the LSTM grew. Restore it before the model (growth
    changes the model's shapes)."""

    def __init__(self, reg: OutputRegularizer, grow_to: Callable[[int], None]) -> None:
        self.reg, self.grow_to, self.grown = reg, grow_to, 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"importance.{j}": v for j, v in enumerate(self.reg.importance)}, "grown": torch.tensor(self.grown)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.grow_to(int(tensors["grown"]))
        self.reg.importance = [tensors[f"importance.{j}"] for j in range(sum(k.startswith("importance.")
                                                                             for k in tensors))]


def make_stream(config: RnnHypernetConfig, scenario: str, seed: int):
    train_set, test_set = digits("train", size=config.image_size), digits("test", size=config.image_size)
    if scenario == "split":
        return task_incremental(train_set, test_set, config.n_tasks, seed=seed), 10 // config.n_tasks
    return domain_incremental(
        train_set, test_set, config.n_tasks, seed=derive_seed(seed, "perm"), with_task_ids=True
    ), 10


def make_hnet(config: RnnHypernetConfig, method: str, n_params: int) -> HyperNetwork:
    common = {
        "chunk_size": config.chunk_size,
        "emb_dim": config.emb_dim,
        "chunk_emb_dim": config.chunk_emb_dim,
    }
    if method.startswith("rnn"):
        return LSTMHyperNet(n_params, hidden=config.hnet_hidden, **common)
    hidden = config.hnet_hidden
    if method == "chunked-hnet-matched":  # the narrowest chunked hnet with ≥ the LSTM hnet's parameters
        budget = count_parameters(LSTMHyperNet(n_params, hidden=config.hnet_hidden, **common))
        while count_parameters(ChunkedMLPHyperNet(n_params, hidden=(hidden,), **common)) < budget:
            hidden += 1
    return ChunkedMLPHyperNet(n_params, hidden=(hidden,), **common)


def accuracy_matrix(config: RnnHypernetConfig, ctx: TrialContext, scenario: Scenario, method: Method) -> dict:
    """The accuracy matrix of one method on one scenario, resumable after every task."""
    stream, n_out = make_stream(config, scenario, ctx.seed)
    tests = [e.test for e in stream]
    ctx.seeded(scenario, method, "init")
    target = MLP(config.image_size**2, n_out, hidden=(config.hidden, config.hidden))
    n_target = sum(p.numel() for p in target.parameters())
    hyper = method.startswith(("rnn", "chunked"))
    model: nn.Module
    objects: dict[str, Any] = {}
    callbacks: list[Any] = []
    if hyper:
        hnet = make_hnet(config, method, n_target)
        model = HyperModel(target, hnet)
        while hnet.n_tasks < config.n_tasks:  # every task's embedding exists from the start (untrained ones
            hnet.add_task()  # give the chance-level entries above the diagonal)
        reg = OutputRegularizer(model, HnetRegConfig(beta=config.beta, importance=method.endswith("-grow"),
                                                     fisher_samples=min(128, config.fisher_samples)))

        def grow_to(i: int) -> None:  # growth before task i
            while method.endswith("-grow") and progress.grown < i:
                hnet.grow(config.growth)
                progress.grown += 1

        progress = HnetProgress(reg, grow_to)
        objects["progress"], callbacks = progress, [reg]
    else:
        model = target
        if scenario == "split":
            model.head = MultiHead(config.hidden, [n_out] * config.n_tasks)
        if method == "ewc":
            ewc = EWC(model, EWCConfig(lam=config.ewc_lambda, fisher_samples=config.fisher_samples))
            objects["ewc"], callbacks = ewc, [ewc]
    objects["model"] = model

    def step(i: int, seed: int) -> list[float]:
        if hyper:
            progress.grow_to(i)
        tc = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, lr=config.lr, optimizer="adam",
                         seed=seed, description=f"{scenario} {method} task {i}")
        train(model, stream[i].train, tc, callbacks=callbacks, experience=stream[i])
        return accuracy_row(model, tests)

    R = ctx.stream(f"{scenario}/{method}", config.n_tasks, step, objects)
    return {"R": R, "trainable": count_parameters(model), "target": n_target}


def trial(config: RnnHypernetConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    return {s: {m: accuracy_matrix(config, ctx, s, m) for m in config.methods} for s in config.scenarios}


def diff(acc: dict[str, list[float]], a: str, b: str, side: Side = ">") -> Effect:
    return paired(f"acc({a}) − acc({b})", acc[a], acc[b], side=side)


def summarise(config: RnnHypernetConfig, records: list[dict[str, Any]]) -> Results:
    tables, claims, figures = {}, [], {}
    for scenario in config.scenarios:
        runs = {m: [r[scenario][m] for r in records] for m in config.methods}
        acc = {m: [average_accuracy(r["R"]) for r in rs] for m, rs in runs.items()}
        tables[f"{scenario} digits ({config.n_tasks} tasks, task identity given)"] = [
            {"method": m, "average accuracy (%)": pm(acc[m]), "forgetting (%)": pm([forgetting(r["R"]) for r in rs]),
             "trainable parameters": rs[0]["trainable"], "target parameters": rs[0]["target"]}
            for m, rs in runs.items()]
        if {"rnn-hnet", "chunked-hnet", "ewc", "finetune"} <= set(config.methods):
            chunked = [m for m in ("chunked-hnet", "chunked-hnet-matched") if m in acc]
            best = max(chunked, key=lambda m: float(np.mean(acc[m])))  # the better chunked hnet on average

            claims.append(claim(f"{scenario}: RNN hypernet ≥ chunked MLP hypernet (best of plain and "
                                "parameter-matched) > EWC > finetune",
                                diff(acc, "rnn-hnet", best, ">="), diff(acc, best, "ewc"),
                                diff(acc, "ewc", "finetune"),
                                measured={f"acc({m})": float(np.mean(acc[m])) for m in config.methods},
                                paper="rnn-hypernetwork"))
            target = runs["ewc"][0]["target"]
            fewer = {m: runs[m][0]["trainable"] for m in ("rnn-hnet", "chunked-hnet")}
            claims.append(claim(f"{scenario}: the hypernetworks have fewer trainable parameters than the target",
                                *(effect(f"params({m}) − params(target)",
                                         [r["trainable"] - r["target"] for r in runs[m]], side="<") for m in fewer),
                                measured={**{f"params({m})": n for m, n in fewer.items()}, "target": target},
                                paper="rnn-hypernetwork"))
        figures.update(mean_heatmaps(runs, prefix=f"{scenario} / "))
    notes = [
        "The RNN hypernetwork has no public code; see the assumptions in weightlab.methods.hypernet.hypernetworks "
        "and docs/continual.md. rnn-hnet-grow adds Fisher-weighted regularisation and growth (our reading).",
        "The best chunked hypernetwork (plain or parameter-matched) is chosen by its mean accuracy over seeds.",
        "quick runs 3 seeds, not 5, to keep its cost (about 3 CPU-minutes); full runs 5.",
    ]
    return Results(tables=tables, claims=claims, notes=notes, figures=figures)


experiment("rnn-hypernetwork", paper="rnn-hypernetwork", config=RnnHypernetConfig, trial=trial, summarise=summarise,
           summary="RNN vs chunked MLP hypernetworks vs EWC vs finetune on split and permuted digits",
           profiles={"smoke": {"methods": ("rnn-hnet", "rnn-hnet-grow", "chunked-hnet", "ewc", "finetune"), "seeds": 1,
                               "steps": 10, "n_tasks": 2, "hidden": 32, "chunk_size": 100, "hnet_hidden": 8,
                               "fisher_samples": 16},
                     "full": {"seeds": 5, "steps": 2000, "n_tasks": 10, "image_size": 16, "hidden": 256,
                              "chunk_size": 2000, "hnet_hidden": 64}})
