"""Experiment ``rnn-hypernetwork``: continual learning with an RNN (LSTM) hypernetwork.

Two scenarios with task identity given at test time (CL1): split Fashion-MNIST (task-incremental, 2 classes per
task) and permuted Fashion-MNIST (``data``; digits and MNIST-5k too), on one seeded subset of ``n_train``
training and ``n_test`` test images. The target network is an MLP; strategies:

* ``rnn-hnet@<r>``: the LSTM hypernetwork generating the target's weights chunk by chunk, with the output
  regulariser β, sized to a compression ratio ``r`` (trainable hypernetwork parameters / target parameters);
* ``chunked-hnet@<r>``: von Oswald's chunked MLP hypernetwork at the same ratio; ``rnn-hnet-grow@<r>``
  (optional): Fisher-weighted regulariser and LSTM growth (our reading of the paper);
* ``ewc`` (online, one anchor) and ``finetune``: the target network trained directly (one head per task on
  split data).

Each hypernetwork is the widest one (hidden units of its LSTM or MLP) whose trainable parameters, task
embeddings included, stay within ``r ×`` the target's. Every method with a knob gets the same search on the
validation split with the first seed — β for the hypernetworks, λ for EWC — and the criterion is the mean
validation accuracy after the last task. Every method trains ``steps`` Adam steps per task.

Claims, per scenario: the RNN hypernetwork ≥ the chunked MLP hypernetwork at each ratio; the best hypernetwork
(chosen on validation) > EWC > finetune. Forgetting, ``R_ii``, training loss and accuracy are reported beside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from weightlab.data import domain_incremental, load_dataset, task_incremental
from weightlab.data.digits import SIZES
from weightlab.errors import WeightlabError
from weightlab.experiments._binary_cl_summary import just_learned, mean_heatmaps
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Fraction, NonNegative, NonNegativeInt, Positive
from weightlab.experiments.results import Results, claim
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
from weightlab.stats import Effect, Side, paired
from weightlab.train import TrainConfig, accuracy, accuracy_row, average_accuracy, forgetting, train
from weightlab.utils import derive_seed

Method = Literal["rnn-hnet", "rnn-hnet-grow", "chunked-hnet", "ewc", "finetune"]
Scenario = Literal["split", "permuted"]
Data = Literal["fashion-mnist", "mnist-5k", "digits"]
METHODS: tuple[Method, ...] = ("rnn-hnet", "chunked-hnet", "ewc", "finetune")
SCENARIOS: tuple[Scenario, ...] = ("split", "permuted")


@dataclass(frozen=True)
class RnnHypernetConfig(ExperimentConfig):
    seeds: Count = 5
    data: Data = "fashion-mnist"
    n_tasks: Count = 5
    image_size: Count = 14
    n_train: Count = 5000
    n_test: Count = 2000
    hidden: Count = 64  # target MLP: in-64-64-out
    steps: Count = 1000  # optimisation steps per task
    batch_size: Count = 32
    lr: Positive = 0.001
    betas: tuple[NonNegative, ...] = (0.01, 0.05, 0.2)  # output-regulariser grid (hypernetworks)
    ewc_lambdas: tuple[NonNegative, ...] = (10.0, 100.0, 1000.0)
    ratios: tuple[Fraction, ...] = (0.1, 0.5)  # hypernetwork / target trainable parameters
    emb_dim: Count = 8
    chunk_emb_dim: Count = 4
    chunk_size: Count = 200
    growth: NonNegativeInt = 2  # LSTM units added per new task by rnn-hnet-grow
    fisher_samples: Count = 256
    methods: tuple[Method, ...] = METHODS
    scenarios: tuple[Scenario, ...] = SCENARIOS

    def check(self) -> None:
        if self.n_tasks < 2 or 10 % self.n_tasks:
            raise WeightlabError(f"n_tasks must be ≥ 2 and divide the 10 classes, got {self.n_tasks}")
        if self.data == "digits" and self.image_size not in SIZES:
            raise WeightlabError(f"image_size: digits come at sizes {', '.join(map(str, SIZES))}, "
                                 f"got {self.image_size}")
        if not self.betas or not self.ewc_lambdas or not self.ratios:
            raise WeightlabError("betas, ewc_lambdas and ratios must each hold at least one value")


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


def method_names(config: RnnHypernetConfig) -> list[str]:
    """``rnn-hnet@0.1``, ``chunked-hnet@0.1``, …: every hypernetwork at every ratio, then the baselines."""
    return [f"{m}@{r:g}" if m.endswith(("hnet", "grow")) else m for m in config.methods
            for r in (config.ratios if m.endswith(("hnet", "grow")) else (None,))]


def make_stream(config: RnnHypernetConfig, scenario: str, seed: int):
    """This seed's subset of the data as a split (task-incremental) or permuted stream, with its output size."""
    full = load_dataset(config.data, "train", size=config.image_size)
    test = load_dataset(config.data, "test", size=config.image_size)
    gen = torch.Generator().manual_seed(derive_seed(seed, "data"))
    train_set = full.subset(torch.randperm(len(full), generator=gen)[: min(config.n_train, len(full))])
    test = test.subset(torch.randperm(len(test), generator=gen)[: min(config.n_test, len(test))])
    if scenario == "split":
        return task_incremental(train_set, test, config.n_tasks, seed=seed), 10 // config.n_tasks
    return domain_incremental(train_set, test, config.n_tasks, seed=derive_seed(seed, "perm"), with_task_ids=True), 10


def make_hnet(config: RnnHypernetConfig, method: str, n_params: int, ratio: float) -> HyperNetwork:
    """The widest hypernetwork of ``method``'s kind with at most ``ratio × n_params`` trainable parameters
    (its ``n_tasks`` task embeddings included)."""
    common = {"chunk_size": config.chunk_size, "emb_dim": config.emb_dim, "chunk_emb_dim": config.chunk_emb_dim}

    def build(width: int) -> HyperNetwork:
        if method.startswith("rnn"):
            return LSTMHyperNet(n_params, hidden=width, **common)
        return ChunkedMLPHyperNet(n_params, hidden=(width,), **common)

    def size(width: int) -> int:
        return count_parameters(build(width)) + config.n_tasks * config.emb_dim

    budget = ratio * n_params
    if size(1) > budget:
        raise WeightlabError(f"ratio {ratio:g}: even one hidden unit gives {size(1)} > {budget:.0f} parameters; "
                             "raise the ratio or the chunk_size")
    lo, hi = 1, 2
    while size(hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # size grows with width: bisect for the widest that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return build(lo)


class Run:
    """One method with one knob value (β or λ) on one stream: model, callbacks, checkpointable objects."""

    def __init__(self, config: RnnHypernetConfig, scenario: str, method: str, knob: float, n_out: int) -> None:
        self.config, self.method = config, method
        base, _, ratio = method.partition("@")
        target = MLP(config.image_size**2, n_out, hidden=(config.hidden, config.hidden))
        self.n_target = sum(p.numel() for p in target.parameters())
        self.hyper = bool(ratio)
        self.objects: dict[str, Any] = {}
        self.callbacks: list[Any] = []
        if self.hyper:
            hnet = make_hnet(config, base, self.n_target, float(ratio))
            self.model: nn.Module = HyperModel(target, hnet)
            while hnet.n_tasks < config.n_tasks:  # every task's embedding exists from the start (untrained
                hnet.add_task()  # ones give the chance-level entries above the diagonal)
            grow = base.endswith("-grow")
            reg = OutputRegularizer(self.model, HnetRegConfig(beta=knob, importance=grow,
                                                              fisher_samples=min(128, config.fisher_samples)))

            def grow_to(i: int) -> None:  # growth before task i
                while grow and self.progress.grown < i:
                    hnet.grow(config.growth)
                    self.progress.grown += 1

            self.progress = HnetProgress(reg, grow_to)
            self.objects["progress"], self.callbacks = self.progress, [reg]
        else:
            self.model = target
            if scenario == "split":
                self.model.head = MultiHead(config.hidden, [n_out] * config.n_tasks)
            if method == "ewc":
                ewc = EWC(self.model, EWCConfig(lam=knob, fisher_samples=config.fisher_samples))
                self.objects["ewc"], self.callbacks = ewc, [ewc]
        self.objects["model"] = self.model

    def learn(self, exp: Any, seed: int) -> dict[str, Any]:
        if self.hyper:
            self.progress.grow_to(exp.task_id)
        c = self.config
        tc = TrainConfig(max_steps=c.steps, batch_size=c.batch_size, lr=c.lr, optimizer="adam", seed=seed,
                         description=f"{self.method} task {exp.task_id}")
        state = train(self.model, exp.train, tc, callbacks=self.callbacks, experience=exp)
        return {"loss": state.epoch_losses[-1], "train accuracy": accuracy(self.model, exp.train)}


def knobs(config: RnnHypernetConfig, method: str) -> tuple[float, ...]:
    return config.betas if "@" in method else config.ewc_lambdas if method == "ewc" else (0.0,)


def choose(config: RnnHypernetConfig, ctx: TrialContext, scenario: str, method: str) -> dict[str, Any]:
    """Mean validation accuracy after the last task for each knob value (first seed), and the best value."""
    sel = ctx.for_seed(config.seed)
    stream, n_out = make_stream(config, scenario, config.seed)

    def score(knob: float) -> float:
        run = Run(config, scenario, method, knob, n_out)
        for exp in stream:
            run.learn(exp, derive_seed(config.seed, "search", scenario, method, exp.task_id))
        return float(np.mean(accuracy_row(run.model, [e.val for e in stream])))

    values = knobs(config, method)
    if len(values) == 1:
        return {"grid": [{"knob": values[0], "val": math.nan}], "best": {"knob": values[0], "val": math.nan}}
    grid = [{"knob": k, "val": sel.cached(f"search/{scenario}/{method}/{k:g}", lambda k=k: score(k))} for k in values]
    return {"grid": grid, "best": max(grid, key=lambda g: g["val"])}


def accuracy_matrix(config: RnnHypernetConfig, ctx: TrialContext, scenario: str, method: str, knob: float) -> dict:
    """The test accuracy matrix of one method on one scenario, resumable after every task."""
    stream, n_out = make_stream(config, scenario, ctx.seed)
    tests = [e.test for e in stream]
    ctx.seeded(scenario, method, "init")
    run = Run(config, scenario, method, knob, n_out)

    def step(i: int, seed: int) -> dict[str, Any]:
        diag = run.learn(stream[i], seed)
        return {"row": accuracy_row(run.model, tests), **diag}

    rows = ctx.stream(f"{scenario}/{method}", config.n_tasks, step, run.objects)
    return {"R": [r["row"] for r in rows], "loss": [r["loss"] for r in rows],
            "train accuracy": [r["train accuracy"] for r in rows], "trainable": count_parameters(run.model),
            "target": run.n_target}


def trial(config: RnnHypernetConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in config.scenarios:
        chosen = {m: choose(config, ctx, s, m) for m in method_names(config)}
        out[s] = {m: {**accuracy_matrix(config, ctx, s, m, chosen[m]["best"]["knob"]), "search": chosen[m]}
                  for m in method_names(config)}
    return out


def diff(acc: dict[str, list[float]], a: str, b: str, side: Side = ">") -> Effect:
    return paired(f"acc({a}) − acc({b})", acc[a], acc[b], side=side)


def summarise(config: RnnHypernetConfig, records: list[dict[str, Any]]) -> Results:
    tables, claims, figures, names = {}, [], {}, method_names(config)
    for scenario in config.scenarios:
        runs = {m: [r[scenario][m] for r in records] for m in names}
        acc = {m: [average_accuracy(r["R"]) for r in rs] for m, rs in runs.items()}
        tables[f"{scenario} {config.data} ({config.n_tasks} tasks, task identity given)"] = [
            {"method": m, "chosen β / λ": f"{rs[0]['search']['best']['knob']:g}",
             "average accuracy (%)": pm(acc[m]), "forgetting (%)": pm([forgetting(r["R"]) for r in rs]),
             "just-learned R_ii (%)": pm([just_learned(r["R"]) for r in rs]),
             "train accuracy, last task (%)": pm([r["train accuracy"][-1] for r in rs]),
             "train loss, last epoch of each task": ", ".join(f"{np.mean([r['loss'][t] for r in rs]):.3f}"
                                                             for t in range(config.n_tasks)),
             "trainable / target parameters": f"{rs[0]['trainable']} / {rs[0]['target']} "
                                              f"({rs[0]['trainable'] / rs[0]['target']:.2f})"}
            for m, rs in runs.items()]
        tables[f"{scenario}: search on the validation split (first seed)"] = [
            {"method": m, "β / λ": f"{g['knob']:g}", "validation accuracy (%)": f"{100 * g['val']:.1f}"}
            for m in names for g in runs[m][0]["search"]["grid"] if not math.isnan(g["val"])]
        for r in config.ratios:
            rnn, chunked = f"rnn-hnet@{r:g}", f"chunked-hnet@{r:g}"
            if rnn in acc and chunked in acc:
                claims.append(claim(f"{scenario}: RNN hypernet ≥ chunked MLP hypernet at compression ratio {r:g}",
                                    diff(acc, rnn, chunked, ">="), paper="rnn-hypernetwork",
                                    measured={f"acc({rnn})": float(np.mean(acc[rnn])),
                                              f"acc({chunked})": float(np.mean(acc[chunked]))}))
        hyper = [m for m in names if "@" in m]
        if hyper and {"ewc", "finetune"} <= set(names):
            best = max(hyper, key=lambda m: runs[m][0]["search"]["best"]["val"])  # chosen on validation
            claims.append(claim(f"{scenario}: the best hypernetwork ({best}, chosen on validation) > EWC > finetune",
                                diff(acc, best, "ewc"), diff(acc, "ewc", "finetune"), paper="rnn-hypernetwork",
                                measured={f"acc({m})": float(np.mean(acc[m])) for m in names}))
        figures.update(mean_heatmaps(runs, prefix=f"{scenario} / "))
    n = min(config.n_test, 10_000) // config.n_tasks
    notes = [
        "The RNN hypernetwork has no public code; see the assumptions in weightlab.methods.hypernet.hypernetworks "
        "and docs/continual.md. rnn-hnet-grow adds Fisher-weighted regularisation and growth (our reading).",
        f"Each hypernetwork is the widest of its kind within ratio × the target's parameters (ratios "
        f"{', '.join(f'{r:g}' for r in config.ratios)}); β (hypernetworks, grid {config.betas}) and λ (EWC, grid "
        f"{config.ewc_lambdas}) are chosen on the validation split with the first seed; lr {config.lr:g} for all; "
        f"{config.steps} Adam steps per task, batch {config.batch_size}.",
        f"Test images per task ≈ {n}; binomial standard error of one task's accuracy at 90 % ≈ "
        f"{100 * math.sqrt(0.09 / max(n, 1)):.1f} pp (the average over tasks has less).",
    ]
    return Results(tables=tables, claims=claims, notes=notes, figures=figures)


experiment("rnn-hypernetwork", paper="rnn-hypernetwork", config=RnnHypernetConfig, trial=trial, summarise=summarise,
           summary="RNN vs chunked MLP hypernetworks at equal compression vs EWC vs finetune on split and permuted "
                   "Fashion-MNIST",
           profiles={"smoke": {"methods": ("rnn-hnet", "rnn-hnet-grow", "chunked-hnet", "ewc", "finetune"), "seeds": 1,
                               "data": "digits", "image_size": 8, "steps": 10, "n_tasks": 2, "hidden": 32,
                               "chunk_size": 100, "betas": (0.01,), "ewc_lambdas": (100.0,), "ratios": (0.5,),
                               "fisher_samples": 16},
                     "full": {"seeds": 10, "steps": 2000, "n_tasks": 5, "image_size": 28, "n_train": 60000,
                              "n_test": 10000, "hidden": 256, "chunk_size": 2000,
                              "ratios": (0.1, 0.2, 0.3, 0.5)}})
