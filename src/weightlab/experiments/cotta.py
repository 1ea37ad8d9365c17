"""Experiment ``cotta``: continual test-time adaptation on long streams of corrupted Fashion-MNIST (paper key
``cotta``).

A BatchNorm CNN (:class:`~weightlab.models.SmallCNN`) is trained once on clean images (the source model, as the
paper uses one pretrained model for all seeds; augmented with random affine copies and flips, as CIFAR models
are), with a held-out validation split of the training set for its curves and for CoTTA's anchor threshold. It
then meets the 15 corruptions in sequence at severity 5, repeated for ``rounds`` rounds, and predicts every batch
before (source, BN-adapt) or while (Tent, CoTTA) adapting, on two streams: ``iid`` (each domain shuffled, the
paper's protocol) and ``label_shift`` (each domain ordered by Dirichlet class proportions over time, so batches
hold few classes). Seeds change the corrupted images, their order, and the methods' randomness; every method of
a seed sees the identical stream. Claims (paper Table 2 and §4.2): mean error CoTTA < Tent ≤ BN-adapt < source,
and Tent's error grows over the rounds while CoTTA's does not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from weightlab.data import ArrayDataset, load_dataset, random_affine, stratified_split
from weightlab.data.corruptions import CORRUPTIONS
from weightlab.data.digits import SIZES
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Corruption,
    Count,
    ExperimentConfig,
    Fraction,
    NonNegativeInt,
    Positive,
    Probability,
    Severity,
)
from weightlab.experiments.results import Results, claim
from weightlab.methods.cotta.cotta import CoTTA, CoTTAConfig, anchor_threshold_rule
from weightlab.methods.cotta.streams import Domain, continual_stream, repeated
from weightlab.methods.cotta.tent import BNAdapt, Tent, TentConfig
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.claims import seeds_phrase
from weightlab.report.tables import pm
from weightlab.runs import TrialContext
from weightlab.stats import Effect, Side, binomial_se, effect, mean_ci95, paired
from weightlab.train import TrainConfig, accuracy, predict, train
from weightlab.utils import choose_device, derive_seed

LABELS = {"source": "Source", "bn_adapt": "BN adapt", "tent": "Tent-continual", "cotta": "CoTTA"}
PAPER_CIFAR10C = {"source": 43.5, "bn_adapt": 20.4, "tent": 20.7, "cotta": 16.2}  # Table 2, WRN-28, error %
SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impulse",
         "defocus_blur": "defocus", "glass_blur": "glass", "motion_blur": "motion", "zoom_blur": "zoom",
         "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "bright", "contrast": "contrast", "elastic_transform": "elastic",
         "pixelate": "pixel", "jpeg_compression": "jpeg"}

Method = Literal["source", "bn_adapt", "tent", "cotta"]
METHODS: tuple[Method, ...] = ("source", "bn_adapt", "tent", "cotta")
StreamKind = Literal["iid", "label_shift"]
STREAMS: tuple[StreamKind, ...] = ("iid", "label_shift")
STREAM_LABELS = {"iid": "i.i.d. stream", "label_shift": "label-shifted stream"}


@dataclass(frozen=True)
class CoTTAExperimentConfig(ExperimentConfig):
    seeds: Count = 5
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    image_size: Count = 16
    width: Count = 16
    epochs: Count = 6  # the source model's training
    lr: Positive = 0.05
    val_fraction: Fraction = 0.1  # of the training split, held out: source validation curve, anchor threshold
    augment_copies: NonNegativeInt = 1  # random-affine (+ flip) copies of the training set for the source model
    severity: Severity = 5
    n_per_domain: Count = 256  # quick: 4 batches of 64 per corruption, 60 updates per round (full: 3200, 750)
    draws: Count = 1  # corruption draws per chosen test image
    batch_size: Count = 64
    rounds: Count = 10
    streams: tuple[StreamKind, ...] = STREAMS
    dirichlet_alpha: Positive = 0.1  # label_shift: class proportions over time ~ Dirichlet(alpha), slot = batch
    corruptions: tuple[Corruption, ...] = CORRUPTIONS
    methods: tuple[Method, ...] = METHODS
    tent_lr: Positive = 1e-3
    cotta_lr: Positive = 1e-3
    anchor_threshold: Probability | None = None  # None: the maintainer's rule on the held-out source data
    n_augmentations: Count = 32
    restore_prob: Probability = 0.01
    ema_momentum: Probability = 0.9875  # quick: 600 steps × (1 − 0.9875) = 7.5, the paper's teacher movement
    # (full: the paper's 0.999 over its 7,500 steps)
    flip_prob: Probability = 0.5  # the reference's; a mirrored garment is the same garment (0 for digits)

    def check(self) -> None:
        if not self.corruptions or not self.methods or not self.streams:
            raise WeightlabError("corruptions, methods and streams must not be empty")
        if self.data == "digits" and self.image_size not in SIZES:
            raise WeightlabError(f"image_size: digits come at sizes {', '.join(map(str, SIZES))}, "
                                 f"got {self.image_size}")


def source_data(config: CoTTAExperimentConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, validation)`` of the source: a stratified ``val_fraction`` of the training split held out."""
    full = load_dataset(config.data, "train", size=config.image_size)
    assert isinstance(full, ArrayDataset)
    keep, held = stratified_split(full.y, config.val_fraction,
                                  generator=torch.Generator().manual_seed(derive_seed(config.seed, "val")))
    return full.subset(keep), full.subset(held)


def augmented(data: ArrayDataset, copies: int, *, seed: int, flip: bool) -> ArrayDataset:
    """``data`` followed by ``copies`` random-affine copies (each image mirrored with probability ½ if
    ``flip``)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [data.x], [data.y]
    for _ in range(copies):
        x = random_affine(data.x, generator=g)  # (N, C, H, W)
        if flip:
            mirror = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        xs.append(x)
        ys.append(data.y)
    return ArrayDataset(torch.cat(xs), torch.cat(ys))


def source_model(config: CoTTAExperimentConfig, ctx: TrialContext) -> tuple[SmallCNN, dict[str, Any]]:
    """The source model trained on clean images once, with the first seed (as the paper uses one pretrained
    model for all seeds); saved in the run directory and reloaded by the other seeds and on resume."""
    source = ctx.for_seed(config.seed)
    source.seeded("source", "init")
    model = SmallCNN(10, width=config.width)

    def fit() -> dict[str, Any]:
        train_set, val_set = source_data(config)
        tc = TrainConfig(epochs=config.epochs, batch_size=64, lr=config.lr, schedule="cosine",
                         seed=derive_seed(config.seed, "source"), description="source model")
        fit_set = augmented(train_set, config.augment_copies, seed=derive_seed(config.seed, "augment"),
                            flip=config.flip_prob > 0)
        state = train(model, fit_set, tc)
        logits, _ = predict(model, val_set)  # held-out clean source images
        test_set = load_dataset(config.data, "test", size=config.image_size)
        return {"epoch_losses": list(state.epoch_losses),
                "train_error": 100 * (1 - accuracy(model, train_set)),
                "val_error": 100 * (1 - accuracy(model, val_set)),
                "clean_test_error": 100 * (1 - accuracy(model, test_set)),
                "n_train": len(fit_set), "n_val": len(val_set),
                "anchor_threshold_rule": anchor_threshold_rule(logits.softmax(1).max(1).values)}

    info = source.fitted("source", {"model": model}, fit)
    return model.to(choose_device("auto")), info  # where train() leaves it: a reloaded model = a fresh one


def make_adapter(method: str, model: nn.Module, config: CoTTAExperimentConfig, seed: int,
                 threshold: float) -> nn.Module:
    """A module ``x -> logits`` that adapts (or not) as ``method`` does."""
    if method == "source":
        return model.eval()
    if method == "bn_adapt":
        return BNAdapt(model)
    if method == "tent":
        return Tent(model, TentConfig(lr=config.tent_lr))
    return CoTTA(model, CoTTAConfig(lr=config.cotta_lr, anchor_threshold=threshold, seed=seed,
                                    n_augmentations=config.n_augmentations, restore_prob=config.restore_prob,
                                    ema_momentum=config.ema_momentum, flip_prob=config.flip_prob))


def run_stream(adapter: nn.Module, stream: list[Domain], batch_size: int) -> list[float]:
    """Error (%) on each domain of ``stream``, predicting each batch with ``adapter`` as it arrives."""
    errors = []
    device = next(adapter.parameters()).device
    for domain in stream:
        wrong = 0
        for batch in domain.data.batches(batch_size):
            batch = batch.to(device)
            with torch.no_grad():  # the adapters enable autograd where they need it
                logits = adapter(batch.x)
            wrong += int((logits.argmax(1) != batch.y).sum())
        errors.append(100.0 * wrong / len(domain.data))
    return errors


def make_stream(config: CoTTAExperimentConfig, kind: StreamKind, seed: int) -> list[Domain]:
    """One round of this seed's stream of ``kind`` (the same for every method)."""
    test_set = load_dataset(config.data, "test", size=config.image_size)
    assert isinstance(test_set, ArrayDataset)
    shift = config.dirichlet_alpha if kind == "label_shift" else None
    return continual_stream(test_set, severity=config.severity, corruptions=config.corruptions, seed=seed,
                            n=min(config.n_per_domain, len(test_set)), draws=config.draws, label_shift=shift,
                            slot_size=config.batch_size)


def majority_fraction(stream: list[Domain], batch_size: int) -> float:
    """Mean share of a batch's most frequent class over the stream (0.1 for balanced 10-class batches)."""
    shares = [float(torch.bincount(b.y).max()) / len(b.y) for d in stream for b in d.data.batches(batch_size)]
    return float(np.mean(shares))


def trial(config: CoTTAExperimentConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Errors per domain (rounds × corruptions) of every method on this seed's streams."""
    source, info = source_model(config, ctx)
    threshold = info["anchor_threshold_rule"] if config.anchor_threshold is None else config.anchor_threshold
    k = len(config.corruptions)

    built: dict[str, list[Domain]] = {}

    def stream_of(kind: StreamKind) -> list[Domain]:
        if kind not in built:
            built[kind] = make_stream(config, kind, seed)
        return built[kind]

    def errors_of(kind: StreamKind, method: Method) -> dict[str, Any]:
        stream = stream_of(kind)
        adapter = make_adapter(method, copy.deepcopy(source), config, seed, threshold)
        errors = run_stream(adapter, repeated(stream, config.rounds), config.batch_size)
        out: dict[str, Any] = {"errors": [errors[r * k:(r + 1) * k] for r in range(config.rounds)]}
        if isinstance(adapter, CoTTA):
            out["augmented_fraction"] = adapter.augmented_steps / max(adapter.step_count, 1)
        return out

    streams = {}
    for kind in config.streams:
        methods = {m: ctx.cached(f"{kind}_{m}", lambda kind=kind, m=m: errors_of(kind, m)) for m in config.methods}
        shape = ctx.cached(f"{kind}_shape", lambda kind=kind: {
            "majority_fraction": majority_fraction(stream_of(kind), config.batch_size),
            "images_per_domain": len(stream_of(kind)[0].data),
            "updates_per_round": sum(-(-len(d.data) // config.batch_size) for d in stream_of(kind))})
        streams[kind] = {"methods": methods, **shape}
    return {"source": info, "threshold": threshold, "streams": streams}


# ------------------------------------------------------------------------------------------ summary


def _ordering(first: dict[str, np.ndarray], label: str) -> Any:
    def lower(a: str, b: str, side: Side = "<") -> Effect:
        return paired(f"error({a}) − error({b})", first[a].tolist(), first[b].tolist(), side=side)

    return claim(f"mean error CoTTA < Tent ≤ BN-adapt < source ({label}, round 1, severity 5)",
                 lower("cotta", "tent"), lower("tent", "bn_adapt", "<="), lower("bn_adapt", "source"),
                 measured={f"error({m})": float(first[m].mean()) for m in METHODS},
                 paper="CIFAR10-C: 16.2 < 20.7 vs 20.4 < 43.5 (so Tent > BN-adapt in the paper)")


def _growth(per_round: dict[str, np.ndarray], rounds: int, label: str) -> Any:
    growth = {m: (per_round[m][:, -1] - per_round[m][:, 0]).tolist() for m in ("tent", "cotta")}
    return claim(f"Tent's error grows over {rounds} rounds while CoTTA's does not ({label}; last-round minus "
                 "first-round mean error, pp)",
                 effect("growth(tent)", growth["tent"], side=">"),
                 effect("growth(cotta)", growth["cotta"], side="<="),
                 paper="§4.2: Tent degrades over 10 rounds, CoTTA stays stable")


def _interval(values: np.ndarray) -> str:
    mean, ci = mean_ci95(values.tolist())
    return f"{mean:+.1f}" if ci is None else f"{mean:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def per_corruption_wins(errors: dict[str, np.ndarray], corruptions: tuple[str, ...], rival: str) -> list[dict]:
    """Per corruption: CoTTA − ``rival`` paired over seeds (round 1 and all rounds), with CoTTA's wins."""
    rows = []
    for j, c in enumerate(corruptions):
        first = errors["cotta"][:, 0, j] - errors[rival][:, 0, j]  # (seeds,)
        every = errors["cotta"][:, :, j].mean(1) - errors[rival][:, :, j].mean(1)
        rows.append({"corruption": SHORT[c], "round 1: Δ error [95% CI]": _interval(first),
                     "round 1: CoTTA wins": f"{int((first < 0).sum())}/{len(first)}",
                     "all rounds: Δ error [95% CI]": _interval(every),
                     "all rounds: CoTTA wins": f"{int((every < 0).sum())}/{len(every)}"})
    return rows


def summarise_stream(config: CoTTAExperimentConfig, records: list[dict[str, Any]], kind: StreamKind) -> Results:
    errors = {m: np.asarray([r["streams"][kind]["methods"][m]["errors"] for r in records])
              for m in config.methods}  # (seeds, rounds, corruptions)
    label = STREAM_LABELS[kind]
    first = {m: e[:, 0].mean(1) for m, e in errors.items()}  # (seeds,) mean error of round 1
    per_round = {m: e.mean(2) for m, e in errors.items()}  # (seeds, rounds)
    table = []
    for m, e in errors.items():
        row: dict[str, object] = {"method": LABELS[m]}
        row.update({SHORT[c]: f"{e[:, 0, j].mean():.1f}" for j, c in enumerate(config.corruptions)})
        row["mean"] = pm(first[m], scale=1.0)
        row["mean, all rounds"] = pm(per_round[m].mean(1), scale=1.0)
        row["paper CIFAR10-C mean"] = PAPER_CIFAR10C[m]
        table.append(row)
    rounds_table = [{"method": LABELS[m], **{f"round {r + 1}": pm(v[:, r], scale=1.0)
                                             for r in range(v.shape[1])}} for m, v in per_round.items()]
    tables = {f"{label}: error (%) per corruption, round 1, severity {config.severity}": table,
              f"{label}: mean error (%) per round": rounds_table}
    for rival in ("tent", "bn_adapt"):
        if {"cotta", rival} <= set(config.methods):
            tables[f"{label}: CoTTA − {LABELS[rival]} per corruption (pp, paired over seeds)"] = \
                per_corruption_wins(errors, config.corruptions, rival)
    claims = []
    if set(METHODS) <= set(config.methods):
        claims.append(_ordering(first, label))
    if {"tent", "cotta"} <= set(config.methods) and config.rounds > 1:
        claims.append(_growth(per_round, config.rounds, label))
    series = {LABELS[m]: v.mean(0).tolist() for m, v in per_round.items()}
    band = {LABELS[m]: v.std(0).tolist() for m, v in per_round.items()}
    figure = plots.curves(series, band=band, x=list(range(1, config.rounds + 1)), xlabel="round",
                          ylabel="mean error (%)",
                          title=f"{label}: {seeds_phrase(len(records))}, severity {config.severity}")
    notes = [f"{label}: the batch's most frequent class holds "
             f"{100 * np.mean([r['streams'][kind]['majority_fraction'] for r in records]):.0f}% of a batch on average"]
    if "cotta" in errors:
        frac = float(np.mean([r["streams"][kind]["methods"]["cotta"]["augmented_fraction"] for r in records]))
        notes.append(f"{label}: CoTTA used the augmented teacher on {100 * frac:.0f}% of the batches")
    if "bn_adapt" in errors:
        p, n = float(first["bn_adapt"].mean()) / 100, records[0]["streams"][kind]["images_per_domain"]
        one, mean = (100 * binomial_se(p, m) for m in (n, n * len(config.corruptions)))
        notes.append(f"{label}: binomial standard error at BN-adapt's error: {one:.2f} pp for one corruption "
                     f"({n} images), {mean:.2f} pp for a round's mean")
    return Results(tables=tables, claims=claims, notes=notes, figures={f"error_per_round_{kind}": figure})


def summarise(config: CoTTAExperimentConfig, records: list[dict[str, Any]]) -> Results:
    parts = [summarise_stream(config, records, kind) for kind in config.streams]
    info, threshold = records[0]["source"], records[0]["threshold"]
    how = ("rule: 5% quantile of the source model's confidence on the held-out clean validation images − 0.05"
           if config.anchor_threshold is None else "set")
    shape = records[0]["streams"][config.streams[0]]
    updates, images = shape["updates_per_round"], shape["images_per_domain"]
    losses = ", ".join(f"{v:.3f}" for v in info["epoch_losses"])
    notes = [f"source model (SmallCNN width {config.width}, {config.data} at {config.image_size} px, trained once, "
             f"seed {config.seed}, {info['n_train']} training images with augmented copies): training loss per "
             f"epoch {losses}; error on its clean training images {info['train_error']:.1f}%, on the "
             f"{info['n_val']} held-out validation images {info['val_error']:.1f}%, clean test "
             f"{info['clean_test_error']:.1f}%",
             f"anchor threshold {threshold:.3f} ({how})",
             f"stream: {updates} updates per round at batch {config.batch_size} ({images} images per corruption, "
             f"{config.draws} draw(s) per test image), {config.rounds} rounds: steps × (1 − EMA momentum) = "
             f"{updates * config.rounds * (1 - config.ema_momentum):.2f} (paper ≈ 7.5)",
             "hyper-parameters: the paper's CIFAR-10 settings for every method (Adam 1e-3 for Tent and CoTTA, "
             f"restore 0.01, 32 augmentations), not tuned; EMA momentum {config.ema_momentum} (paper 0.999; lower "
             "only where the stream is shorter, so that the teacher moves as far in total); the anchor threshold "
             "from the source validation split; nothing chosen on the test stream"]
    for part in parts:
        notes.extend(part.notes)
    return Results(tables={k: v for part in parts for k, v in part.tables.items()},
                   claims=[c for part in parts for c in part.claims], notes=notes,
                   figures={k: v for part in parts for k, v in part.figures.items()},
                   data={"anchor_threshold": threshold, **info})


experiment("cotta", paper="cotta", config=CoTTAExperimentConfig, trial=trial, summarise=summarise,
           summary="source vs BN-adapt vs Tent vs CoTTA on long i.i.d. and label-shifted streams of the 15 "
                   "corruptions of Fashion-MNIST at severity 5, repeated for 10 rounds",
           profiles={"smoke": {"seeds": 1, "data": "digits", "epochs": 1, "width": 8, "augment_copies": 0,
                               "val_fraction": 0.2, "n_per_domain": 32, "batch_size": 32, "rounds": 2,
                               "corruptions": ("gaussian_noise", "contrast"), "n_augmentations": 2,
                               "flip_prob": 0.0},
                     "full": {"n_per_domain": 3200, "ema_momentum": 0.999}})
