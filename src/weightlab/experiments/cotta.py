"""Experiment ``cotta``: continual test-time adaptation on a stream of corrupted digits (paper key ``cotta``).

A BatchNorm CNN (:class:`~weightlab.models.SmallCNN`) is trained once on clean 16×16 digits (the source
model, as the paper uses one pretrained model for all seeds). It then meets the 15 corruptions in sequence
at severity 5, repeated for ``rounds`` rounds, and predicts every batch before (source, BN-adapt) or while
(Tent, CoTTA) adapting. Seeds change the corrupted images, their order within a domain, and the methods'
randomness. Claims (paper Table 2 and §4.2): mean error CoTTA < Tent ≤ BN-adapt < source, and Tent's
error grows over the rounds while CoTTA's does not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from weightlab.data import digits
from weightlab.data.corruptions import CORRUPTIONS
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import (
    Corruption,
    Count,
    Digits,
    DigitsSize,
    ExperimentConfig,
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
from weightlab.stats import Effect, Side, effect, paired
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


@dataclass(frozen=True)
class CoTTAExperimentConfig(ExperimentConfig):
    data: Digits = "digits"
    image_size: DigitsSize = 16
    width: Count = 16
    epochs: Count = 8  # the source model's training
    lr: Positive = 0.05
    augment_to: Count | None = 5000  # random-affine enlarged training set (CIFAR models train with
    # augmentation too, so the source model is not thrown by CoTTA's geometric test-time augmentations)
    severity: Severity = 5
    n_per_domain: Count = 128
    batch_size: Count = 64
    rounds: Count = 10
    corruptions: tuple[Corruption, ...] = CORRUPTIONS
    methods: tuple[Method, ...] = METHODS
    tent_lr: Positive = 1e-3
    cotta_lr: Positive = 1e-3
    anchor_threshold: Probability | None = None  # None: the maintainer's rule on the source training data
    n_augmentations: Count = 32
    restore_prob: Probability = 0.01
    ema_momentum: Probability = 0.999
    flip_prob: Probability = 0.0  # the reference flips half the augmented copies; a mirrored digit is another digit

    def check(self) -> None:
        if not self.corruptions or not self.methods:
            raise WeightlabError("corruptions and methods must not be empty")


def source_model(config: CoTTAExperimentConfig, ctx: TrialContext) -> tuple[SmallCNN, dict[str, float]]:
    """The source model trained on clean digits once, with the first seed (as the paper uses one pretrained
    model for all seeds); saved in the run directory and reloaded by the other seeds and on resume."""
    source = ctx.for_seed(config.seed)
    source.seeded("source", "init")
    model = SmallCNN(10, width=config.width)

    def fit() -> dict[str, float]:
        train_set = digits("train", size=config.image_size, augment_to=config.augment_to, seed=config.seed)
        tc = TrainConfig(epochs=config.epochs, batch_size=64, lr=config.lr, schedule="cosine",
                         seed=derive_seed(config.seed, "source"), description="source model")
        train(model, train_set, tc)
        logits, _ = predict(model, digits("train", size=config.image_size))  # the clean source images
        return {"clean_test_error": 100 * (1 - accuracy(model, digits("test", size=config.image_size))),
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


def trial(config: CoTTAExperimentConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Errors per domain (rounds × corruptions) of every method on this seed's stream."""
    source, info = source_model(config, ctx)
    threshold = info["anchor_threshold_rule"] if config.anchor_threshold is None else config.anchor_threshold

    def errors_of(method: Method) -> dict[str, Any]:
        test_set = digits("test", size=config.image_size)
        stream = continual_stream(test_set, severity=config.severity, corruptions=config.corruptions,
                                  seed=seed, n=config.n_per_domain)
        adapter = make_adapter(method, copy.deepcopy(source), config, seed, threshold)
        errors = run_stream(adapter, repeated(stream, config.rounds), config.batch_size)
        k = len(config.corruptions)
        out: dict[str, Any] = {"errors": [errors[r * k:(r + 1) * k] for r in range(config.rounds)]}
        if isinstance(adapter, CoTTA):
            out["augmented_fraction"] = adapter.augmented_steps / max(adapter.step_count, 1)
        return out

    return {"source": info, "threshold": threshold,
            "methods": {m: ctx.cached(m, lambda m=m: errors_of(m)) for m in config.methods}}


def summarise(config: CoTTAExperimentConfig, records: list[dict[str, Any]]) -> Results:
    errors = {m: np.asarray([r["methods"][m]["errors"] for r in records]) for m in config.methods}
    first = {m: e[:, 0].mean(1) for m, e in errors.items()}  # (seeds,) mean error of round 1
    table = []
    for m, e in errors.items():
        row: dict[str, object] = {"method": LABELS[m]}
        row.update({SHORT[c]: f"{e[:, 0, j].mean():.1f}" for j, c in enumerate(config.corruptions)})
        row["mean"] = pm(first[m], scale=1.0)
        row["paper CIFAR10-C mean"] = PAPER_CIFAR10C[m]
        table.append(row)
    per_round = {m: e.mean(2) for m, e in errors.items()}  # (seeds, rounds)
    rounds_table = [{"method": LABELS[m], **{f"round {r + 1}": pm(v[:, r], scale=1.0)
                                             for r in range(v.shape[1])}} for m, v in per_round.items()]

    def lower(a: str, b: str, side: Side = "<") -> Effect:
        return paired(f"error({a}) − error({b})", first[a].tolist(), first[b].tolist(), side=side)

    claims = []
    if set(METHODS) <= set(config.methods):
        claims.append(claim("mean error CoTTA < Tent ≤ BN-adapt < source (round 1, severity 5)",
                            lower("cotta", "tent"), lower("tent", "bn_adapt", "<="), lower("bn_adapt", "source"),
                            measured={f"error({m})": float(first[m].mean()) for m in METHODS},
                            paper="CIFAR10-C: 16.2 < 20.7 vs 20.4 < 43.5 (so Tent > BN-adapt in the paper)"))
    if {"tent", "cotta"} <= set(config.methods) and config.rounds > 1:
        growth = {m: (per_round[m][:, -1] - per_round[m][:, 0]).tolist() for m in ("tent", "cotta")}
        claims.append(claim(f"Tent's error grows over {config.rounds} rounds while CoTTA's does not "
                            "(last-round minus first-round mean error, pp)",
                            effect("growth(tent)", growth["tent"], side=">"),
                            effect("growth(cotta)", growth["cotta"], side="<="),
                            paper="§4.2: Tent degrades over 10 rounds, CoTTA stays stable"))
    series = {LABELS[m]: v.mean(0).tolist() for m, v in per_round.items()}
    band = {LABELS[m]: v.std(0).tolist() for m, v in per_round.items()}
    figure = plots.curves(series, band=band, x=list(range(1, config.rounds + 1)), xlabel="round",
                          ylabel="mean error (%)", title=f"{seeds_phrase(len(records))}, severity {config.severity}")
    info, threshold = records[0]["source"], records[0]["threshold"]
    how = "rule: 5% quantile of source confidence − 0.05" if config.anchor_threshold is None else "set"
    notes = [f"source model (trained once, seed {config.seed}): clean test error {info['clean_test_error']:.1f}%; "
             f"anchor threshold {threshold:.3f} ({how})",
             f"{config.n_per_domain} images per corruption, batch {config.batch_size}, {config.rounds} rounds",
             "quick runs 3 seeds, not 5, to keep its cost (about 2 CPU-minutes); full runs 5."]
    if "cotta" in errors:
        frac = float(np.mean([r["methods"]["cotta"]["augmented_fraction"] for r in records]))
        notes.append(f"CoTTA used the augmented teacher on {100 * frac:.0f}% of the batches")
    return Results(tables={f"Error (%) per corruption, round 1, severity {config.severity}": table,
                           "Mean error (%) per round": rounds_table},
                   claims=claims, notes=notes, figures={"error_per_round": figure},
                   data={"anchor_threshold": threshold, **info})


experiment("cotta", paper="cotta", config=CoTTAExperimentConfig, trial=trial, summarise=summarise,
           summary="source vs BN-adapt vs Tent vs CoTTA on 15 corruptions of digits at severity 5, repeated",
           profiles={"smoke": {"seeds": 1, "epochs": 2, "width": 8, "augment_to": None, "n_per_domain": 32,
                               "batch_size": 32, "rounds": 2, "corruptions": ("gaussian_noise", "fog", "contrast"),
                               "n_augmentations": 4},
                     "full": {"seeds": 5, "rounds": 10, "n_per_domain": 360, "epochs": 15}})
