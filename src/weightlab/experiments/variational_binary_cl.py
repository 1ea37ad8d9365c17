"""Experiment ``variational-binary-cl``: binary-weight continual learning by the variational field rule.

Permuted Fashion-MNIST (``data``; MNIST-5k and digits too): ``n_tasks`` pixel permutations of one fixed subset of
``n_train`` training images (plus ``augment_copies`` random-affine copies of each, made before permuting), task
0 unpermuted; a binary MLP. Strategies: the variational rule with the previous task's field as prior
(``variational-task``) and with the field one step earlier (``variational-step``, the reference code), both
with **one** Adam across all tasks (as the reference code); the metaplastic BNN (``meta``); plain binary
training (``binary``: the BNN with m = 0); EWC on a real-valued MLP, online (one anchor, summed Fisher: online
EWC with γ = 1, ``ewc-online``) and with per-task anchors (``ewc-per-task``).

Every method gets the same search on a validation split (held out of the training images, permuted like them),
with the first seed: two learning rates × three values of its own knob (``kl_weight`` for variational-task,
``β_max`` for variational-step, ``m`` for meta, ``λ`` for EWC; plain binary has only the learning rates). The
criterion is the mean validation accuracy over all tasks after the last one. Every seed is then run with the
chosen values. Variational networks are evaluated by the stochastic mean-field pass (as the reference code);
the final row is also evaluated with binary weights sampled from q and with the noise-free mean pass.

Claims: variational ≥ metaplasticity > plain binary in average accuracy after the last task; each variational
prior beats plain binary. Diagonal ``R_ii`` (accuracy on a task just after learning it), training accuracy
and the loss curves are reported beside. The teacher–student perceptron part (:mod:`._teacher_student`)
simulates teacher 1 then teacher 2 with and without the previous-task prior, beside the replica mean-field
(Franz–Parisi) prediction of the overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from weightlab.data import ArrayDataset, Experience, concat, load_dataset, permute_pixels
from weightlab.data.digits import SIZES, random_affine
from weightlab.errors import WeightlabError
from weightlab.experiments import _teacher_student as ts
from weightlab.experiments._binary_cl_summary import summarise
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, NonNegative, NonNegativeInt, Positive, Range
from weightlab.methods.binary_cl.metaplasticity import BinaryMLP, MetaplasticAdam, MetaplasticityConfig
from weightlab.methods.binary_cl.variational import (
    BetaAnnealing,
    VariationalBinaryMLP,
    VariationalConfig,
    VariationalFieldAdam,
    annealed_beta,
    binary_layers,
    forward_mode,
)
from weightlab.methods.continual.ewc import EWC, EWCConfig
from weightlab.models import MLP
from weightlab.runs import TrialContext
from weightlab.train import TrainConfig, accuracy, accuracy_row, train
from weightlab.utils import derive_seed

Method = Literal["variational-task", "variational-step", "meta", "binary", "ewc-online", "ewc-per-task"]
METHODS: tuple[Method, ...] = ("variational-task", "variational-step", "meta", "binary", "ewc-online",
                               "ewc-per-task")
Data = Literal["fashion-mnist", "mnist-5k", "digits"]


@dataclass(frozen=True)
class VariationalBinaryConfig(ExperimentConfig):
    seeds: Count = 5
    data: Data = "fashion-mnist"
    n_tasks: Annotated[int, Range(2)] = 3
    image_size: Count = 14
    n_train: Count = 1500  # original training images (each task permutes the same ones)
    n_val: Count = 1000
    n_test: Count = 2000
    augment_copies: NonNegativeInt = 1
    hidden: Count = 128
    epochs: Count = 20
    batch_size: Count = 64
    variational_lrs: tuple[Positive, ...] = (0.01, 0.003)
    kl_weights: tuple[NonNegative, ...] = (5e-4, 1.25e-4, 3.125e-5)  # variational-task (1/n_train ≈ 3e-4 here)
    beta_maxes: tuple[Positive, ...] = (5.0, 10.0, 20.0)  # variational-step (variational-task uses beta_max)
    beta_max: Positive = 10.0
    binary_lrs: tuple[Positive, ...] = (0.005, 0.002)  # meta and binary
    meta_values: tuple[NonNegative, ...] = (1.35, 5.0, 20.0)
    ewc_lrs: tuple[Positive, ...] = (0.001, 0.003)
    ewc_lambdas: tuple[NonNegative, ...] = (10.0, 100.0, 1000.0)
    fisher_samples: Count = 256
    methods: tuple[Method, ...] = METHODS
    # teacher–student perceptron and its mean-field theory
    perceptron_n: Count = 500
    perceptron_alphas: tuple[Positive, ...] = (0.5, 1.0, 2.0)
    teacher_overlap: Annotated[float, Range(-1, 1)] = 0.5
    perceptron_epochs: Count = 20
    perceptron_lr: Positive = 0.01
    perceptron_beta: Positive = 1.0  # the field's β in m = tanh(βθ) (an annealed β freezes task 2)
    mean_field_beta: Positive = 20.0
    mean_field_nodes: Annotated[int, Range(16)] = 121

    def check(self) -> None:
        if self.data == "digits" and self.image_size not in SIZES:
            raise WeightlabError(f"image_size: digits come at sizes {', '.join(map(str, SIZES))}, "
                                 f"got {self.image_size}")
        for name in ("variational_lrs", "kl_weights", "beta_maxes", "binary_lrs", "meta_values", "ewc_lrs",
                     "ewc_lambdas", "perceptron_alphas"):
            if not getattr(self, name):
                raise WeightlabError(f"{name} must hold at least one value")


def permuted_stream(config: VariationalBinaryConfig, seed: int) -> list[Experience]:
    """The permuted tasks: one seeded subset of train / validation / test images, the training part enlarged
    by affine copies (before permuting, so each copy is permuted like its original)."""
    full = load_dataset(config.data, "train", size=config.image_size)
    test = load_dataset(config.data, "test", size=config.image_size)
    if config.n_train + config.n_val > len(full):
        raise WeightlabError(f"n_train + n_val = {config.n_train + config.n_val} must fit in {config.data}'s "
                             f"{len(full)} training images")
    gen = torch.Generator().manual_seed(derive_seed(seed, "data"))
    pick = torch.randperm(len(full), generator=gen)
    train_set = full.subset(pick[: config.n_train])
    val = full.subset(pick[config.n_train:config.n_train + config.n_val])
    test = test.subset(torch.randperm(len(test), generator=gen)[: config.n_test])  # all of them if fewer
    copies = [ArrayDataset(random_affine(train_set.x, generator=gen), train_set.y)
              for _ in range(config.augment_copies)]
    train_set = concat([train_set, *copies])
    d = config.image_size**2
    perms = [torch.arange(d)] + [torch.randperm(d, generator=gen) for _ in range(config.n_tasks - 1)]
    return [Experience(*(ArrayDataset(permute_pixels(s.x, p), s.y) for s in (train_set, test, val)),
                       tuple(range(10)), i) for i, p in enumerate(perms)]


def search_grid(config: VariationalBinaryConfig, method: str) -> list[dict[str, float]]:
    """The (lr, knob) pairs searched for ``method``: two learning rates × three values of its knob."""
    lrs, knobs = {"variational-task": (config.variational_lrs, config.kl_weights),
                  "variational-step": (config.variational_lrs, config.beta_maxes),
                  "meta": (config.binary_lrs, config.meta_values), "binary": (config.binary_lrs, (0.0,)),
                  "ewc-online": (config.ewc_lrs, config.ewc_lambdas),
                  "ewc-per-task": (config.ewc_lrs, config.ewc_lambdas)}[method]
    return [{"lr": lr, "knob": k} for lr in lrs for k in knobs]


class OptimizerState:
    """A torch optimizer's per-parameter state as a flat tensor dict, so that a run checkpoint keeps the one
    Adam that lives across tasks (``<param index>.<key>``; ``None`` entries are left out)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
                for i, p in enumerate(self._params()) for k, v in self.optimizer.state.get(p, {}).items()
                if v is not None}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self._params()
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            self.optimizer.state[params[int(i)]][name] = int(value) if name == "step" else value.clone()


class Learner:
    """One method with one (lr, knob) setting: the model, its optimizer(s) and callbacks, trained task by task."""

    def __init__(self, config: VariationalBinaryConfig, method: str, hp: dict[str, float]) -> None:
        self.config, self.method, self.hp = config, method, hp
        d_in, hidden = config.image_size**2, (config.hidden, config.hidden)
        self.variational = method.startswith("variational")
        self.objects: dict[str, Any] = {}
        if self.variational:
            self.model: torch.nn.Module = VariationalBinaryMLP(d_in, 10, hidden)
            prior = method.split("-")[1]
            beta_max = hp["knob"] if prior == "step" else config.beta_max
            self.vc = VariationalConfig(lr=hp["lr"], prior=prior, beta_max=beta_max,  # type: ignore[arg-type]
                                        kl_weight=hp["knob"] if prior == "task" else None)
            self.opt = VariationalFieldAdam(binary_layers(self.model), self.vc, kl_weight=self.vc.resolved_kl_weight(
                n_train=config.n_train, batch_size=config.batch_size))  # one Adam across tasks (reference code)
            self.objects["optimizer"] = OptimizerState(self.opt)
        elif method.startswith("ewc"):
            self.model = MLP(d_in, 10, hidden=hidden)
            anchors = "per-task" if method == "ewc-per-task" else "online"
            self.ewc = EWC(self.model, EWCConfig(lam=hp["knob"], fisher_samples=config.fisher_samples, anchors=anchors))
            self.objects["ewc"] = self.ewc
        else:
            self.model = BinaryMLP(d_in, 10, hidden)
        self.objects["model"] = self.model

    def learn(self, exp: Experience, seed: int) -> dict[str, Any]:
        """Train on one task; its epoch losses and final training accuracy (on the original images)."""
        c = self.config
        tc = TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=self.hp["lr"], seed=seed, optimizer="adam",
                         description=f"{self.method} task {exp.task_id}")
        callbacks: list = []
        if self.variational:
            opt: torch.optim.Optimizer = self.opt
            callbacks.append(BetaAnnealing(self.model, self.vc, n_tasks=c.n_tasks, epochs=c.epochs))
        elif self.method.startswith("ewc"):
            opt = torch.optim.Adam(self.model.parameters(), lr=self.hp["lr"])
            callbacks.append(self.ewc)
        else:  # rebuilt per task, as in Laborieux's code
            opt = MetaplasticAdam(self.model, MetaplasticityConfig(m=self.hp["knob"], lr=self.hp["lr"]))
        state = train(self.model, exp.train, tc, callbacks=callbacks, experience=exp, optimizer=opt)
        if self.variational and self.vc.prior == "task":
            self.opt.consolidate()  # the fields at the end of task i are the prior of task i + 1
        originals = exp.train.subset(torch.arange(min(c.n_train, 1000)))
        return {"losses": state.epoch_losses, "train accuracy": accuracy(self.model, originals)}

    def final_modes(self, tests: list[ArrayDataset]) -> dict[str, list[float]]:
        """The last row with sampled binary weights and with the noise-free mean pass (variational only)."""
        if not self.variational:
            return {}
        beta = annealed_beta(self.config.n_tasks - 1, self.config.epochs - 1, n_tasks=self.config.n_tasks,
                             epochs=self.config.epochs, beta_max=self.vc.beta_max)
        for layer in binary_layers(self.model):
            layer.beta = beta
        out = {}
        for mode in ("sample", "mean"):
            with forward_mode(self.model, mode):
                out[mode] = accuracy_row(self.model, tests)
        return out


def search(config: VariationalBinaryConfig, ctx: TrialContext, method: str) -> dict[str, Any]:
    """Every grid point's mean validation accuracy after the last task (first seed), and the best point."""
    sel = ctx.for_seed(config.seed)
    stream = permuted_stream(config, config.seed)
    vals = [e.val for e in stream]

    def run(hp: dict[str, float]) -> float:
        learner = Learner(config, method, hp)
        for i, exp in enumerate(stream):
            learner.learn(exp, derive_seed(config.seed, "search", method, i))
        return float(np.mean(accuracy_row(learner.model, vals)))

    grid = [{**hp, "val": sel.cached(f"search/{method}/{hp['lr']:g}-{hp['knob']:g}", lambda hp=hp: run(hp))}
            for hp in search_grid(config, method)]
    return {"grid": grid, "best": max(grid, key=lambda g: g["val"])}


def accuracy_matrix(config: VariationalBinaryConfig, ctx: TrialContext, method: str, hp: dict[str, float]) -> dict:
    """The test accuracy matrix with the chosen setting, and per task the training diagnostics."""
    stream = permuted_stream(config, ctx.seed)
    tests = [e.test for e in stream]
    ctx.seeded(method, "init")
    learner = Learner(config, method, hp)

    def step(i: int, seed: int) -> dict[str, Any]:
        diag = learner.learn(stream[i], seed)
        ctx.seeded(method, i, "eval")
        return {"row": accuracy_row(learner.model, tests), **diag}

    rows = ctx.stream(method, config.n_tasks, step, learner.objects)
    ctx.seeded(method, "modes")
    return {"R": [r["row"] for r in rows], "losses": [r["losses"] for r in rows],
            "train accuracy": [r["train accuracy"] for r in rows], **learner.final_modes(tests)}


def teacher_student(config: VariationalBinaryConfig, seed: int) -> dict[str, dict[str, list[float]]]:
    """The simulated curves for every α, with (``True``) and without (``False``) the previous-task prior."""
    return {f"{alpha:g}/{w}": ts.simulate(n=config.perceptron_n, alpha=alpha, teacher_overlap=config.teacher_overlap,
                                          epochs=config.perceptron_epochs, lr=config.perceptron_lr,
                                          beta=config.perceptron_beta, seed=seed, with_prior=w)
            for alpha in config.perceptron_alphas for w in (True, False)}


def trial(config: VariationalBinaryConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every method's search (shared by all seeds), its test matrix on this seed, and the teacher–student part."""
    searches = {m: search(config, ctx, m) for m in config.methods}
    theory = ctx.for_seed(config.seed).cached("mean-field", lambda: ts.theory(
        alphas=config.perceptron_alphas, teacher_overlap=config.teacher_overlap, beta=config.mean_field_beta,
        nodes=config.mean_field_nodes))
    return {"search": searches, "methods": {m: accuracy_matrix(config, ctx, m, searches[m]["best"])
                                            for m in config.methods},
            "teacher_student": ctx.cached("teacher-student", lambda: teacher_student(config, seed)),
            "mean_field": theory, "n_test": min(config.n_test, len(load_dataset(config.data, "test")))}


experiment("variational-binary-cl", paper="variational-binary-cl", config=VariationalBinaryConfig, trial=trial,
           summarise=summarise,
           summary="variational field-space binary CL vs metaplasticity, plain binary and EWC on permuted "
                   "Fashion-MNIST, with the teacher–student mean-field theory",
           profiles={"smoke": {"seeds": 2, "data": "digits", "image_size": 8, "n_train": 300, "n_val": 100,
                               "n_test": 200, "augment_copies": 0, "epochs": 1, "n_tasks": 2, "hidden": 32,
                               "variational_lrs": (0.01,), "kl_weights": (1e-3,), "beta_maxes": (10.0,),
                               "binary_lrs": (0.005,), "meta_values": (20.0,), "ewc_lrs": (0.003,),
                               "ewc_lambdas": (100.0,), "fisher_samples": 16, "perceptron_n": 60,
                               "perceptron_alphas": (1.0,), "perceptron_epochs": 2, "mean_field_nodes": 31},
                     "full": {"seeds": 5, "epochs": 20, "n_tasks": 6, "image_size": 28, "n_train": 10000,
                              "n_val": 5000, "n_test": 10000, "hidden": 512, "perceptron_n": 1000,
                              "mean_field_nodes": 201}})
