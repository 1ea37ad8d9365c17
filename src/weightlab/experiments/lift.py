"""Experiment ``lift`` (paper key ``lift``): principal-weight sparse fine-tuning of the real pretrained
MiniLM-L6 against full fine-tuning, LoRA (peft) and magnitude-sparse fine-tuning.

Target task: SpamAssassin spam/ham (subject line and body, the first ``max_length`` tokens). The encoder's
first ``6 − blocks`` layers stay frozen (their output is cached once), the last ``blocks`` BERT layers are
fine-tuned with a linear head that starts as a logistic-regression probe on the pretrained embeddings
(the same head for every method). Every method gets the same budget of trainable entries per matrix
(``k = (m + n)·lora_rank``), the same AdamW settings (betas, eps, no weight decay), the same cosine schedule
with warm-up and the same number of steps, over ONE shared learning-rate grid.

Source abilities (what the pretrained model could do before): on generated general-domain sentence pairs
(two phrasings of one meaning, :func:`~weightlab.experiments._lift_text.paraphrase_pairs`), the cosine
agreement of the fine-tuned embeddings with the original model's, and paraphrase retrieval accuracy. Half
of the sentences (validation) choose operating points, the other half (test) report them.

Claims (Liu et al., ICML 2025): LIFT ≥ full FT on the target (each at its best-validation lr); LIFT retains
more source ability than full FT and LoRA at matched target accuracy; LIFT > magnitude-sparse on the target;
randomized-SVD masks vs exact ones (overlap, accuracy).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from weightlab.data import load_dataset
from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.experiments import _lift_text as text
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Positive
from weightlab.experiments.results import Claim, Results, claim
from weightlab.methods.lift.model import LiftConfig, merge_and_unload, prepare
from weightlab.report import plots
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import binomial_se, paired
from weightlab.train import TrainConfig, accuracy, train
from weightlab.utils import derive_seed, seed_everything
from weightlab.weights.lowrank import lora_budget, mask_overlap, principal_weight_mask

Method = Literal["full", "lora", "lift", "magnitude", "random"]
METHODS: tuple[Method, ...] = ("lift", "full", "lora", "magnitude")  # the method under test first
SPARSE = {"lift": "principal", "lift_randomized": "principal", "magnitude": "magnitude", "random": "random"}
LORA_TARGETS = ("query", "key", "value", "dense")  # every nn.Linear of a BERT layer


@dataclass(frozen=True)
class LiftExperimentConfig(ExperimentConfig):
    seeds: Count = 5
    model: Literal["all-minilm-l6-v2"] = "all-minilm-l6-v2"
    data: Literal["spam-assassin"] = "spam-assassin"
    blocks: Count = 1  # fine-tuned last BERT layers (the others are frozen and cached)
    max_length: Count = 24  # tokens per e-mail (subject line first)
    source_length: Count = 16  # tokens per source sentence
    n_train: Count = 384
    n_val: Count = 200
    n_test: Count = 500
    n_source: Count = 300  # paraphrase pairs (half validation, half test)
    epochs: Count = 2
    batch_size: Count = 16
    warmup_steps: int = 5
    lrs: tuple[Positive, ...] = (1e-4, 3e-4, 1e-3, 3e-3)  # ONE grid for every method
    betas: tuple[float, float] = (0.9, 0.95)  # the same AdamW for every method (LIFT's defaults)
    eps: Positive = 1e-6
    lora_rank: Count = 12  # budget k = (m + n)·lora_rank per matrix, ≈ 5% of a BERT layer's linear weights
    filter_rank: Count = 12
    refresh_every: int = 24
    methods: tuple[Method, ...] = METHODS
    randomized: bool = True  # also LIFT with randomized-SVD masks at LIFT's chosen lr

    def check(self) -> None:
        if not 1 <= self.blocks <= 6:
            raise WeightlabError(f"blocks must be in [1, 6] (MiniLM-L6's layers), got {self.blocks}")
        if not 1 <= self.filter_rank <= 384:
            raise WeightlabError(f"filter_rank must be in [1, 384] (MiniLM's width), got {self.filter_rank}")
        if not (self.lrs and self.methods):
            raise WeightlabError("methods and lrs must not be empty")
        if "lift" not in self.methods:
            raise WeightlabError(f"methods must include lift (the method under test), got {self.methods}")
        if self.n_source < 4:
            raise WeightlabError(f"n_source must be ≥ 4 (two halves of ≥ 2 pairs), got {self.n_source}")


@dataclass(frozen=True)
class Data:
    """Cached frozen-layer features ``(N, L, D + 1)`` and labels, the original top layers, and the original
    embeddings of the source sentences."""

    pool: Tensor
    pool_y: Tensor
    test: Tensor
    test_y: Tensor
    source_a: Tensor
    source_b: Tensor
    top: text.TopEncoder
    original_a: Tensor  # (n_source, D)
    original_b: Tensor


@functools.lru_cache(maxsize=2)
def _data(model: str, blocks: int, max_length: int, source_length: int, n_pool: int, n_test: int,
          n_source: int) -> Data:
    from weightlab.models import pretrained
    from weightlab.models.pretrained import pretrained_tokenizer

    encoder, tok = pretrained(model), pretrained_tokenizer(model)
    frozen = len(encoder.encoder.layer) - blocks
    g = torch.Generator().manual_seed(0)
    splits = []
    for split, n in (("train", n_pool), ("test", n_test)):
        ds = load_dataset("spam-assassin", split)
        if n > len(ds):
            raise WeightlabError(f"spam-assassin {split} has {len(ds)} e-mails, asked for {n}")
        idx = torch.randperm(len(ds), generator=g)[:n]
        texts = [text.email_text(ds.texts[i]) for i in idx.tolist()]
        splits.append((text.encode_features(encoder, tok, texts, max_length=max_length, frozen=frozen),
                       ds.y[idx]))
    first, second = text.paraphrase_pairs(n_source, seed=0)
    a, b = (text.encode_features(encoder, tok, s, max_length=source_length, frozen=frozen)
            for s in (first, second))
    top = text.top_encoder(encoder, blocks)
    return Data(*splits[0], *splits[1], a, b, top, text.embed(top, a), text.embed(top, b))


def load(config: LiftExperimentConfig) -> Data:
    return _data(config.model, config.blocks, config.max_length, config.source_length,
                 config.n_train + config.n_val, config.n_test, config.n_source)


def split(config: LiftExperimentConfig, data: Data, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """The seed's (train, validation) split of the cached pool of training e-mails."""
    perm = torch.randperm(len(data.pool), generator=torch.Generator().manual_seed(derive_seed(seed, "split")))
    tr, va = perm[:config.n_train], perm[config.n_train:]
    return ArrayDataset(data.pool[tr], data.pool_y[tr]), ArrayDataset(data.pool[va], data.pool_y[va])


def probe(data: Data, train_set: ArrayDataset, seed: int) -> dict[str, Tensor]:
    """The linear head every method starts from: a probe on the pretrained embeddings of ``train_set``."""
    seed_everything(derive_seed(seed, "probe"))
    head = nn.Linear(data.original_a.shape[1], 2)
    text.fit_probe(head, text.embed(data.top, train_set.x), train_set.y)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def targets(model: nn.Module) -> dict[str, Tensor]:
    """The fine-tuned matrices' original values: every ``nn.Linear`` weight of the top layers."""
    return {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("top.")}


def fine_tune(config: LiftExperimentConfig, model: text.TopClassifier, method: str, lr: float, seed: int,
              train_set: ArrayDataset) -> tuple[nn.Module, float]:
    """Fine-tune ``model`` in place (LoRA merged back); returns the plain module and the last epoch's loss."""
    seed_everything(derive_seed(seed, method, "finetune"))
    tc = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=lr, schedule="cosine",
                     warmup_steps=config.warmup_steps, seed=derive_seed(seed, "finetune"), description=method)
    adamw = {"lr": lr, "betas": config.betas, "eps": config.eps, "weight_decay": 0.0}
    if method == "full":
        state = train(model, train_set, tc, optimizer=torch.optim.AdamW(model.parameters(), **adamw))
        return model, state.epoch_losses[-1]
    if method == "lora":
        import peft

        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                               target_modules=list(LORA_TARGETS), modules_to_save=["classifier"])
        net = peft.get_peft_model(model, lora)
        params = [p for p in net.parameters() if p.requires_grad]
        state = train(net, train_set, tc, optimizer=torch.optim.AdamW(params, **adamw))
        return net.merge_and_unload(), state.epoch_losses[-1]
    lift = prepare(model, LiftConfig(rank=config.filter_rank, lora_rank=config.lora_rank, mask=SPARSE[method],
                                     randomized=method == "lift_randomized", modules_to_save=("classifier",),
                                     refresh_every=config.refresh_every, lr=lr, betas=config.betas,
                                     eps=config.eps, sparse_grad=True, seed=derive_seed(seed, method, "mask"),
                                     track_delta=False))
    state = train(model, train_set, tc, optimizer=lift.optimizer)
    return merge_and_unload(model), state.epoch_losses[-1]


def run_one(config: LiftExperimentConfig, ctx: TrialContext, method: str, lr: float,
            head: dict[str, Tensor]) -> dict[str, float]:
    """Target (validation, test, train) and source measures of ``method`` at ``lr`` on the seed, starting from
    the probe ``head`` (cached)."""
    def compute() -> dict[str, float]:
        data = load(config)
        train_set, val = split(config, data, ctx.seed)
        model = text.TopClassifier(copy.deepcopy(data.top), 2)
        model.classifier.load_state_dict(head)
        before = targets(model)
        model, loss = fine_tune(config, model, method, lr, ctx.seed, train_set)
        test = ArrayDataset(data.test, data.test_y)
        a, b = text.embed(model.top, data.source_a), text.embed(model.top, data.source_b)
        half = config.n_source // 2
        cos = ((a * data.original_a).sum(-1) + (b * data.original_b).sum(-1)) / 2  # (n_source,)
        return {"val": accuracy(model, val, batch_size=256), "target": accuracy(model, test, batch_size=256),
                "train": accuracy(model, train_set, batch_size=256), "train_loss": loss,
                "source_cos_val": cos[:half].mean().item(), "source_cos": cos[half:].mean().item(),
                "retrieval_val": text.retrieval_accuracy(a[:half], b[:half]),
                "retrieval": text.retrieval_accuracy(a[half:], b[half:]),
                "delta": text.relative_update(before, model)}

    return ctx.cached(f"{method}/lr{lr:g}", compute)


def matrix_diagnostics(config: LiftExperimentConfig, top: nn.Module, seed: int) -> list[dict[str, Any]]:
    """Per pretrained target matrix: top-``filter_rank`` spectral energy and exact/randomized mask overlap."""
    rows = []
    for name, m in top.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            k = lora_budget(tuple(w.shape), config.lora_rank)
            torch.manual_seed(derive_seed(seed, "overlap", name))
            overlap = mask_overlap(principal_weight_mask(w, config.filter_rank, k),
                                   principal_weight_mask(w, config.filter_rank, k, randomized=True))
            rows.append({"matrix": name, "shape": "×".join(map(str, w.shape)), "budget (%)": 100 * k / w.numel(),
                         f"top-{config.filter_rank} energy": text.top_energy(w, config.filter_rank),
                         "mask overlap": overlap})
    return rows


def trial(config: LiftExperimentConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Every method at every lr of the shared grid; LIFT with randomized masks at LIFT's best lr."""
    data = load(config)
    train_set, val = split(config, data, seed)
    head = probe(data, train_set, seed)
    grid = {m: {lr: run_one(config, ctx, m, lr, head) for lr in config.lrs} for m in config.methods}
    record: dict[str, Any] = {"grid": {m: [{"lr": lr, **r} for lr, r in g.items()] for m, g in grid.items()}}
    if config.randomized:
        best = max(config.lrs, key=lambda lr: grid["lift"][lr]["val"])
        record["lift_randomized"] = {"lr": best, **run_one(config, ctx, "lift_randomized", best, head),
                                     "exact": grid["lift"][best]["target"]}
    record["matrices"] = matrix_diagnostics(config, data.top, seed)
    frozen = text.TopClassifier(data.top, 2)
    frozen.classifier.load_state_dict(head)
    record["probe"] = {name: accuracy(frozen, d, batch_size=256) for name, d in
                       (("val", val), ("target", ArrayDataset(data.test, data.test_y)), ("train", train_set))}
    half = config.n_source // 2
    record["pretrained_retrieval"] = text.retrieval_accuracy(data.original_a[half:], data.original_b[half:])
    return record


def best_val(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid row with the best validation accuracy (the first on ties)."""
    return max(rows, key=lambda r: r["val"])


def matched(grid: dict[str, list[dict[str, Any]]]) -> tuple[float, dict[str, dict[str, Any]]]:
    """The matched target level — the lowest best validation accuracy of the methods the retention claim
    compares (LIFT, full FT, LoRA; all methods if none of those) — and, per method, the grid row reaching it
    with the best source agreement on the validation sentences (a method that never reaches it: its best row)."""
    compared = [m for m in ("lift", "full", "lora") if m in grid] or list(grid)
    level = min(best_val(grid[m])["val"] for m in compared)
    return level, {m: max((r for r in rows if r["val"] >= level), key=lambda r: r["source_cos_val"],
                          default=best_val(rows)) for m, rows in grid.items()}


def summarise(config: LiftExperimentConfig, records: list[dict[str, Any]]) -> Results:
    methods = list(config.methods)
    best = {m: [best_val(r["grid"][m]) for r in records] for m in methods}
    levels, at = zip(*(matched(r["grid"]) for r in records))
    at_level = {m: [a[m] for a in at] for m in methods}

    def row(m: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"method": m, "lr": ", ".join(sorted({f"{r['lr']:g}" for r in rs})),
                "target acc (%)": pm([r["target"] for r in rs]), "train acc (%)": pm([r["train"] for r in rs]),
                "train loss": pm([r["train_loss"] for r in rs], scale=1, digits=3),
                "source cos": pm([r["source_cos"] for r in rs], scale=1, digits=3),
                "retrieval (%)": pm([r["retrieval"] for r in rs]),
                "‖ΔW‖/‖W‖": pm([r["delta"] for r in rs], scale=1, digits=3)}

    probe_row = {"method": "probe (no fine-tuning)",
                 **{f"{k} acc (%)": pm([r["probe"][k] for r in records]) for k in ("target", "train")},
                 "source cos": "1", "retrieval (%)": pm([r["pretrained_retrieval"] for r in records])}
    tables = {"Each method at its best-validation lr (target: SpamAssassin test)":
                  [probe_row] + [row(m, best[m]) for m in methods],
              "At matched target accuracy (validation ≥ the lowest best of the methods; source-val picks the lr)":
                  [row(m, at_level[m]) for m in methods],
              "Learning-rate grid (every seed)": [{"method": m, "seed": s, **r} for s, rec in zip(range(
                  config.seed, config.seed + len(records)), records) for m in methods for r in rec["grid"][m]],
              "Pretrained matrices: spectral energy, budget, exact vs randomized mask overlap (first seed)":
                  records[0]["matrices"]}
    if config.randomized:
        rnd = [r["lift_randomized"] for r in records]
        tables["LIFT with exact vs randomized-SVD masks (target test accuracy)"] = [
            {"masks": "exact", "target acc (%)": pm([r["exact"] for r in rnd])},
            {"masks": "randomized", "target acc (%)": pm([r["target"] for r in rnd])}]
    n = config.n_test
    above = sum(v > r["probe"]["val"] for v, r in zip(levels, records))
    acc = float(np.mean([r["target"] for r in best["lift"]]))
    notes = [f"MiniLM-L6: the last {config.blocks} of 6 layers fine-tuned (the others frozen, their output cached) "
             f"— to fit the CPU budget; {config.max_length} tokens per e-mail (subject + body), {config.n_train} "
             f"train / {config.n_val} validation e-mails per seed, {n} test e-mails",
             f"test n = {n}: binomial standard error at LIFT's accuracy = {100 * binomial_se(acc, n):.2f} "
             "points",
             f"budget k = (m + n)·{config.lora_rank} per matrix (LoRA rank {config.lora_rank}); filter rank "
             f"{config.filter_rank}; masks refreshed every {config.refresh_every} steps; full FT trains every "
             "parameter of the fine-tuned layers",
             f"one lr grid {config.lrs} for every method; AdamW betas {config.betas}, eps {config.eps:g}, no weight "
             f"decay, cosine schedule with {config.warmup_steps} warm-up steps, {config.epochs} epochs of batch "
             f"{config.batch_size}, for every method; head: a probe on the pretrained embeddings, trained densely",
             "best lr: highest target validation accuracy (the lowest lr on ties); matched: per seed the level is "
             "the lowest best validation accuracy of LIFT, full FT and LoRA, and each method's lr is the one reaching "
             "it with the highest source cosine on the validation sentences; reported source measures are on the "
             "other (test) sentences",
             f"matched level above the probe's own validation accuracy on {above} of {len(records)} seeds "
             "(otherwise the comparison is at no fine-tuning gain)",
             f"overall budget: {100 * budget_share(records[0]['matrices']):.1f}% of the fine-tuned layers' "
             "linear weights",
             f"pretrained paraphrase retrieval (source task, test sentences): "
             f"{100 * records[0]['pretrained_retrieval']:.1f}%; source cos of the pretrained model is 1",
             "matched target levels (validation, per seed): " + ", ".join(f"{100 * v:.1f}%" for v in levels)]
    return Results(tables=tables, claims=make_claims(best, at_level, records, config), notes=notes,
                   data={"matched_levels": list(levels)}, figures={"pareto": pareto(config, records)})


def budget_share(matrices: list[dict[str, Any]]) -> float:
    """``Σ k / Σ m·n`` over the fine-tuned matrices (rows of :func:`matrix_diagnostics`)."""
    sizes = [np.prod([int(d) for d in r["shape"].split("×")]) for r in matrices]
    return float(sum(r["budget (%)"] / 100 * n for r, n in zip(matrices, sizes)) / sum(sizes))


def pareto(config: LiftExperimentConfig, records: list[dict[str, Any]]) -> Any:
    """Target test accuracy against source cosine and retrieval over the lr grid (means over seeds)."""
    fig, axes = plots.grid_of(2, ncols=2, size=4.5)
    for m in config.methods:
        rows = [[r["grid"][m][i] for r in records] for i in range(len(config.lrs))]
        tgt = [np.mean([r["target"] for r in rs]) for rs in rows]
        for ax, key in zip(axes, ("source_cos", "retrieval")):
            ax.plot([np.mean([r[key] for r in rs]) for rs in rows], tgt, marker="o", label=m)
    for ax, label in zip(axes, ("source cosine to the original embeddings", "paraphrase retrieval (source task)")):
        ax.set(xlabel=label, ylabel="target test accuracy", title="lr grid: " + ", ".join(f"{x:g}" for x in config.lrs))
        ax.legend(fontsize=7)
    return fig


def make_claims(best: dict[str, list[dict[str, Any]]], at: dict[str, list[dict[str, Any]]],
                records: list[dict[str, Any]], config: LiftExperimentConfig) -> list[Claim]:
    def diff(rows: dict[str, list[dict[str, Any]]], key: str, a: str, b: str, **side: Any) -> Any:
        return paired(f"{key}({a}) − {key}({b})", [r[key] for r in rows[a]], [r[key] for r in rows[b]], **side)

    have = set(best)
    claims = []
    if "full" in have:
        claims.append(claim("LIFT ≥ full fine-tuning on the target task (within 0.5 points)",
                            diff(best, "target", "lift", "full", side=">=", threshold=-0.005),
                            paper="LIFT > Full FT (Tables 1–2)"))
    if {"full", "lora"} <= have:
        for key, what in (("source_cos", "agreement with the original embeddings"),
                          ("retrieval", "paraphrase retrieval")):
            claims.append(claim(f"at matched target accuracy LIFT retains more source ability ({what}) than full "
                                "FT and LoRA", diff(at, key, "lift", "full"), diff(at, key, "lift", "lora"),
                                measured={f"{key}({m})": float(np.mean([r[key] for r in at[m]]))
                                          for m in ("lift", "full", "lora")},
                                paper="up to 20% more source knowledge"))
    if "magnitude" in have:
        claims.append(claim("LIFT > magnitude-sparse fine-tuning on the target task",
                            diff(best, "target", "lift", "magnitude"), paper="weight-magnitude FT is poor"))
    if config.randomized:
        rnd = [r["lift_randomized"] for r in records]
        lost = paired("target(lift) − target(lift_randomized)", [r["exact"] for r in rnd],
                      [r["target"] for r in rnd], side="<=", threshold=0.005)
        overlap = [m["mask overlap"] for r in records for m in r["matrices"]]
        claims.append(claim("randomized-SVD masks lose ≤ 0.5 points of target accuracy (then they may be the "
                            "default)", lost, measured={"points lost": 100 * lost.mean,
                                                        "mean mask overlap": float(np.mean(overlap))},
                            paper="not a claim of the paper: weightlab's criterion for the default"))
    return claims


experiment("lift", paper="lift", config=LiftExperimentConfig, trial=trial, summarise=summarise,
           summary="LIFT vs full FT, LoRA and magnitude-sparse FT of MiniLM-L6 on SpamAssassin: target accuracy "
                   "and retained source ability",
           profiles={"smoke": {"seeds": 1, "methods": ("full", "lift"), "n_train": 32, "n_val": 16,
                               "n_test": 32, "n_source": 16, "max_length": 12, "source_length": 10, "epochs": 1,
                               "lrs": (1e-3,), "lora_rank": 2, "filter_rank": 2, "refresh_every": 0},
                     "full": {"seeds": 5, "blocks": 6, "max_length": 64, "n_train": 2048, "n_val": 512,
                              "n_test": 1209, "epochs": 3, "lrs": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)}})
