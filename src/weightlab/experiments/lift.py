"""Experiment ``lift`` (paper key ``lift``): principal-weight sparse fine-tuning vs full FT, LoRA and sparse
baselines.

A small transformer (token embeddings, ``depth`` pre-norm blocks from :mod:`weightlab.models.vit`, an output
head over the vocabulary) is pretrained on a *source* task — five two-operand operations modulo ``p``
(``a+b``, ``a−b``, ``max``, ``min``, ``a·b``) — and then fine-tuned on a *target* arithmetic-reasoning task
it has never seen: the three-step sum ``(a + b + c) mod p`` from a fraction of all triples. Every method
trains the same number of steps; LIFT, LoRA and the two sparse baselines train the same number of entries
per matrix (``k = (m + n)·lora_rank``). Each method's learning rate is chosen from its grid on held-out
validation triples (with the first seed), then every seed is run with it. Reported: target accuracy on unseen
triples and source accuracy after fine-tuning (how much of the pretrained knowledge survives).

Claims (Liu et al., ICML 2025): LIFT ≥ full FT on the target; LIFT retains more source accuracy than full FT
and LoRA; LIFT > magnitude-sparse. Also: randomized-SVD masks vs exact ones (overlap, accuracy difference).
The ``full`` profile also fine-tunes the real pretrained MiniLM-L6 with LIFT on a generated text task.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Fraction, Positive, Range
from weightlab.experiments.results import Claim, Results, claim
from weightlab.methods.lift.model import LiftConfig, find_targets, prepare
from weightlab.models.vit import Block
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import paired
from weightlab.train import TrainConfig, accuracy, train
from weightlab.utils import derive_seed, seed_everything
from weightlab.weights.lowrank import lora_budget, mask_overlap, principal_weight_mask

Method = Literal["full", "lora", "lift", "lift_randomized", "magnitude", "random"]
METHODS: tuple[Method, ...] = ("full", "lora", "lift", "lift_randomized", "magnitude", "random")
SPARSE = {"lift": ("principal", False), "lift_randomized": ("principal", True),
          "magnitude": ("magnitude", False), "random": ("random", False)}
TARGETS = ("qkv", "proj", "fc1", "fc2")
# smoke leaves out LoRA: importing peft takes ~6 s
SMOKE_METHODS: tuple[Method, ...] = ("full", "lift", "lift_randomized", "magnitude", "random")
SOURCE_OPS = ("add", "sub", "max", "min", "mul")


Model = Literal["none", "all-minilm-l6-v2"]


@dataclass(frozen=True)
class LiftExperimentConfig(ExperimentConfig):
    seeds: Count = 5
    model: Model = "none"  # "all-minilm-l6-v2": also fine-tune the real MiniLM-L6 with LIFT (first seed)
    modulus: Annotated[int, Range(2)] = 11
    dim: Count = 64
    depth: Count = 2
    heads: Count = 4
    pretrain_epochs: Count = 60
    target_fraction: Fraction = 0.3
    epochs: Count = 20
    batch_size: Count = 32
    lora_rank: Count = 4
    filter_rank: Count = 4
    refresh_every: Count = 100
    full_lrs: tuple[Positive, ...] = (1e-3, 3e-3, 1e-2)
    sparse_lrs: tuple[Positive, ...] = (1e-2, 3e-2, 1e-1)
    lora_lrs: tuple[Positive, ...] = (3e-3, 1e-2, 3e-2)
    select_lr_every_seed: bool = False
    methods: tuple[Method, ...] = METHODS
    model_steps: Count = 120

    def check(self) -> None:
        if not 1 <= self.filter_rank <= self.dim:
            raise WeightlabError(f"filter_rank must be in [1, dim = {self.dim}], got {self.filter_rank}")
        if not (self.full_lrs and self.sparse_lrs and self.lora_lrs and self.methods):
            raise WeightlabError("methods and the learning-rate grids must not be empty")


class TinyTransformer(nn.Module):
    """Token + position embeddings, pre-norm blocks, a final norm and an output ``head`` over the vocabulary
    read at the last position (the ``=`` token)."""

    def __init__(self, vocab: int, seq_len: int, *, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, 2.0) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:  # (B, L) tokens -> (B, vocab)
        h = self.blocks(self.embed(x) + self.pos)  # (B, L, D)
        return self.head(self.norm(h)[:, -1])


def vocab(p: int) -> dict[str, int]:
    """Numbers ``0..p-1`` are their own tokens; operators, ``=`` and padding follow."""
    names = (*SOURCE_OPS, "sum3", "eq", "pad")
    return {n: p + i for i, n in enumerate(names)}


def source_task(p: int) -> ArrayDataset:
    """Every ``[op, a, b, pad, =] -> op(a, b) mod p`` for the five source operations (5·p² examples)."""
    v = vocab(p)
    fns = {"add": lambda a, b: (a + b) % p, "sub": lambda a, b: (a - b) % p, "max": max, "min": min,
           "mul": lambda a, b: (a * b) % p}
    rows = [([v[op], a, b, v["pad"], v["eq"]], fns[op](a, b)) for op in SOURCE_OPS
            for a, b in itertools.product(range(p), repeat=2)]
    return ArrayDataset(torch.tensor([r for r, _ in rows]), torch.tensor([y for _, y in rows]))


def target_task(p: int, fraction: float, *, seed: int) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """``[sum3, a, b, c, =] -> (a + b + c) mod p``: (train, validation, test) splits of all p³ triples;
    train is ``fraction`` of them, validation a third of the rest, test the remainder."""
    v = vocab(p)
    triples = list(itertools.product(range(p), repeat=3))
    x = torch.tensor([[v["sum3"], a, b, c, v["eq"]] for a, b, c in triples])  # (p³, 5)
    y = torch.tensor([sum(t) % p for t in triples])
    data = ArrayDataset(x, y)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_train = int(fraction * len(data))
    n_val = (len(data) - n_train) // 3
    return (data.subset(perm[:n_train]), data.subset(perm[n_train:n_train + n_val]),
            data.subset(perm[n_train + n_val:]))


def build_model(config: LiftExperimentConfig) -> TinyTransformer:
    return TinyTransformer(config.modulus + len(vocab(config.modulus)), 5, dim=config.dim, depth=config.depth,
                           heads=config.heads)


def pretrained(config: LiftExperimentConfig, ctx: TrialContext) -> TinyTransformer:
    """The source-task model of the trial's seed (trained once, then loaded from the run directory)."""
    ctx.seeded("pretrain")
    model = build_model(config)

    def fit() -> None:
        tc = TrainConfig(epochs=config.pretrain_epochs, batch_size=64, lr=3e-3, optimizer="adamw",
                         schedule="cosine", seed=derive_seed(ctx.seed, "pretrain", "loop"),
                         description="pretrain (source)")
        train(model, source_task(config.modulus), tc)

    ctx.fitted("pretrain", {"model": model}, fit)
    return model


def fine_tune(config: LiftExperimentConfig, base: nn.Module, method: str, lr: float, seed: int,
              train_set: ArrayDataset) -> nn.Module:
    """A fine-tuned copy of ``base`` (LoRA is merged back so every method returns the plain architecture)."""
    model = copy.deepcopy(base)
    seed_everything(derive_seed(seed, method, "finetune"))
    tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=lr, optimizer="adamw",
                     schedule="cosine", warmup_steps=10, seed=derive_seed(seed, "finetune"),
                     description=method)
    if method == "full":
        train(model, train_set, tc)
        return model
    if method == "lora":
        import peft

        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                               target_modules=list(TARGETS), lora_dropout=0.0)
        net = peft.get_peft_model(model, lora)
        params = [p for p in net.parameters() if p.requires_grad]
        train(net, train_set, tc, optimizer=torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-6))
        return net.merge_and_unload()
    mask, randomized = SPARSE[method]
    lift = prepare(model, LiftConfig(rank=config.filter_rank, lora_rank=config.lora_rank, mask=mask,
                                     randomized=randomized, target_modules=TARGETS,
                                     refresh_every=config.refresh_every, lr=lr,
                                     seed=derive_seed(seed, method, "mask"), track_delta=False))
    train(model, train_set, tc, optimizer=lift.optimizer)
    lift.optimizer.remove_hooks()
    return model


def lr_grid(config: LiftExperimentConfig, method: Method) -> tuple[float, ...]:
    return config.full_lrs if method == "full" else config.lora_lrs if method == "lora" else config.sparse_lrs


def run_one(config: LiftExperimentConfig, ctx: TrialContext, method: Method, lr: float) -> dict[str, float]:
    """Validation, target, source and train accuracy of ``method`` at ``lr`` on the trial's seed (cached)."""
    def compute() -> dict[str, float]:
        base = pretrained(config, ctx)
        train_set, val, test = target_task(config.modulus, config.target_fraction, seed=derive_seed(ctx.seed, "split"))
        model = fine_tune(config, base, method, lr, ctx.seed, train_set)
        return {"val": accuracy(model, val), "target": accuracy(model, test),
                "source": accuracy(model, source_task(config.modulus)), "train": accuracy(model, train_set)}

    return ctx.cached(f"{method}/lr{lr:g}", compute)


def mask_overlaps(config: LiftExperimentConfig, model: nn.Module) -> dict[str, float]:
    """Overlap of exact and randomized principal-weight masks on each pretrained target matrix."""
    cfg = LiftConfig(rank=config.filter_rank, lora_rank=config.lora_rank, target_modules=TARGETS)
    out = {}
    for name, module in find_targets(model, cfg).items():
        w = module.weight.detach()
        k = lora_budget(tuple(w.shape), config.lora_rank)
        torch.manual_seed(0)
        out[name] = mask_overlap(principal_weight_mask(w, config.filter_rank, k),
                                 principal_weight_mask(w, config.filter_rank, k, randomized=True))
    return out


def trial(config: LiftExperimentConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every method at its learning rate, chosen on validation triples with the first seed (or this seed)."""
    select = ctx if config.select_lr_every_seed else ctx.for_seed(config.seed)
    record: dict[str, Any] = {"methods": {}, "grid": []}
    for method in config.methods:
        grid = {lr: run_one(config, select, method, lr) for lr in lr_grid(config, method)}
        best = max(grid, key=lambda lr: grid[lr]["val"])
        record["methods"][method] = {"lr": best, **run_one(config, ctx, method, best)}
        if select.seed == seed:
            record["grid"] += [{"method": method, "seed": seed, "lr": lr, "chosen": lr == best,
                                **{f"{k} acc (%)": 100 * v for k, v in r.items()}} for lr, r in grid.items()]
    if seed == config.seed:
        base = pretrained(config, ctx)
        record["mask_overlap"] = mask_overlaps(config, base)
        record["pretrained_source_acc"] = accuracy(base, source_task(config.modulus))
        if config.model != "none":
            from weightlab.experiments._lift_minilm import minilm_demo

            record["minilm"] = ctx.cached("minilm", lambda: minilm_demo(steps=config.model_steps, seed=seed))
    return record


def summarise(config: LiftExperimentConfig, records: list[dict[str, Any]]) -> Results:
    results = {m: [r["methods"][m] for r in records] for m in config.methods}
    first, overlap = records[0], records[0]["mask_overlap"]
    rows = [{"method": m, "lr": ", ".join(sorted({f"{r['lr']:g}" for r in rs})),
             "target acc (%)": pm([r["target"] for r in rs]), "source acc (%)": pm([r["source"] for r in rs]),
             "train acc (%)": pm([r["train"] for r in rs])} for m, rs in results.items()]
    notes = [f"pretrained source accuracy (seed {config.seed}): {first['pretrained_source_acc']:.3f}",
             f"budget: k = (m + n)·{config.lora_rank} entries per target matrix ({', '.join(TARGETS)}); "
             f"filter rank {config.filter_rank}; refresh every {config.refresh_every} steps",
             "lr of each method chosen on validation triples " + ("per seed" if config.select_lr_every_seed
                                                                  else f"with seed {config.seed}"),
             "the lr-grid table shows the target/source trade-off of every method (see docs/lift.md)"]
    tables = {"Fine-tuning on (a+b+c) mod p after pretraining on five 2-operand operations": rows,
              "Exact vs randomized SVD masks (pretrained matrices)":
                  [{"matrix": n, "overlap": v} for n, v in overlap.items()],
              "Learning-rate grid (validation picks the lr; source accuracy shows the trade-off)":
                  [row for r in records for row in r["grid"]]}
    if "minilm" in first:
        tables["MiniLM-L6 (real pretrained) fine-tuned with LIFT on a generated text task"] = first["minilm"]
    fig, (ax,) = plots.grid_of(1, ncols=1, size=4.5)
    for m, rs in results.items():
        ax.scatter([r["source"] for r in rs], [r["target"] for r in rs], label=m)
    ax.set(xlabel="source accuracy after fine-tuning", ylabel="target accuracy", title="LIFT vs baselines")
    ax.legend(fontsize=7)
    return Results(tables=tables, claims=make_claims(results, overlap), notes=notes,
                   data={"mask_overlap": overlap}, figures={"target_vs_source": fig})


def make_claims(results: dict[str, list[dict[str, float]]], overlap: dict[str, float]) -> list[Claim]:
    def col(method: str, key: str) -> list[float]:
        return [r[key] for r in results[method]]

    def diff(key: str, a: str, b: str, **side: Any) -> Any:
        return paired(f"{key}({a}) − {key}({b})", col(a, key), col(b, key), **side)

    claims = []
    if {"lift", "full"} <= set(results):
        claims.append(claim("LIFT ≥ full fine-tuning on the target task", diff("target", "lift", "full", side=">="),
                            paper="LIFT > Full FT (Tables 1–2)"))
    if {"lift", "full", "lora"} <= set(results):
        claims.append(claim("LIFT retains more source accuracy than full FT and LoRA",
                            diff("source", "lift", "full"), diff("source", "lift", "lora"),
                            measured={f"source({m})": float(np.mean(col(m, "source")))
                                      for m in ("lift", "full", "lora")},
                            paper="up to 20% more source knowledge"))
    if {"lift", "magnitude"} <= set(results):
        claims.append(claim("LIFT > magnitude-sparse fine-tuning on the target task",
                            diff("target", "lift", "magnitude"), paper="weight-magnitude FT is poor"))
    if {"lift", "lift_randomized"} <= set(results):
        lost = diff("target", "lift", "lift_randomized", side="<=", threshold=0.005)
        claims.append(claim("randomized-SVD masks lose ≤ 0.5 points of target accuracy (then they may be the "
                            "default)", lost,
                            measured={"points lost": 100 * lost.mean,
                                      "mean mask overlap": sum(overlap.values()) / max(len(overlap), 1)},
                            paper="not a claim of the paper: weightlab's criterion for the default"))
    return claims


experiment("lift", paper="lift", config=LiftExperimentConfig, trial=trial, summarise=summarise,
           summary="LIFT vs full FT, LoRA, magnitude- and random-sparse FT: target and source accuracy",
           profiles={"smoke": {"seeds": 1, "methods": SMOKE_METHODS, "modulus": 5, "dim": 32, "depth": 1,
                               "pretrain_epochs": 8, "epochs": 3, "full_lrs": (1e-3,), "sparse_lrs": (1e-2,),
                               "lora_lrs": (1e-2,), "refresh_every": 5, "target_fraction": 0.5},
                     "full": {"seeds": 5, "epochs": 40, "pretrain_epochs": 100,
                              "full_lrs": (3e-4, 1e-3, 3e-3, 1e-2), "sparse_lrs": (3e-3, 1e-2, 3e-2, 1e-1),
                              "lora_lrs": (3e-3, 1e-2, 3e-2, 1e-1), "select_lr_every_seed": True,
                              "model": "all-minilm-l6-v2"}})
