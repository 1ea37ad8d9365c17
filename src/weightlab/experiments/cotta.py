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

import numpy as np
import torch
from torch import nn

from weightlab.data import digits
from weightlab.data.corruptions import CORRUPTIONS
from weightlab.errors import WeightlabError
from weightlab.experiments.base import Claim, Results, experiment
from weightlab.methods.cotta.cotta import CoTTA, CoTTAConfig, anchor_threshold_rule
from weightlab.methods.cotta.streams import Domain, continual_stream, repeated
from weightlab.methods.cotta.tent import BNAdapt, Tent, TentConfig
from weightlab.models import SmallCNN
from weightlab.report import plots
from weightlab.report.tables import mean_std, pm
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, accuracy, predict, train
from weightlab.utils import choose_device, derive_seed, seed_everything

METHODS = ("source", "bn_adapt", "tent", "cotta")
LABELS = {"source": "Source", "bn_adapt": "BN adapt", "tent": "Tent-continual", "cotta": "CoTTA"}
PAPER_CIFAR10C = {"source": 43.5, "bn_adapt": 20.4, "tent": 20.7, "cotta": 16.2}  # Table 2, WRN-28, error %
SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impulse",
         "defocus_blur": "defocus", "glass_blur": "glass", "motion_blur": "motion", "zoom_blur": "zoom",
         "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "bright", "contrast": "contrast", "elastic_transform": "elastic",
         "pixelate": "pixel", "jpeg_compression": "jpeg"}


@dataclass(frozen=True)
class CoTTAExperimentConfig:
    seed: int = 0
    seeds: int = 3
    image_size: int = 16
    width: int = 16
    epochs: int = 8
    train_lr: float = 0.05
    train_augment_to: int | None = 5000  # random-affine enlarged training set (CIFAR models train with
    # augmentation too, so the source model is not thrown by CoTTA's geometric test-time augmentations)
    severity: int = 5
    n_per_domain: int = 128
    batch_size: int = 64
    rounds: int = 10
    corruptions: tuple[str, ...] = CORRUPTIONS
    methods: tuple[str, ...] = METHODS
    tent_lr: float = 1e-3
    cotta_lr: float = 1e-3
    anchor_threshold: float | None = None  # None: the maintainer's rule on the source training data
    n_augmentations: int = 32
    restore_prob: float = 0.01
    ema_momentum: float = 0.999
    flip_prob: float = 0.0  # the reference flips half the augmented copies; a mirrored digit is another digit

    def __post_init__(self) -> None:
        for name in self.corruptions:
            if name not in CORRUPTIONS:
                raise WeightlabError(f"unknown corruption {name!r}; expected one of: "
                                     f"{', '.join(CORRUPTIONS)}")
        for method in self.methods:
            if method not in METHODS:
                raise WeightlabError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
        if self.severity not in range(1, 6):
            raise WeightlabError(f"severity must be an integer from 1 to 5, got {self.severity!r}")
        if self.rounds < 1 or self.seeds < 1 or self.batch_size < 1:
            raise WeightlabError(f"rounds, seeds and batch_size must be ≥ 1, got {self.rounds}, "
                                 f"{self.seeds}, {self.batch_size}")


def source_model(config: CoTTAExperimentConfig, ctx: RunContext) -> tuple[SmallCNN, dict[str, float]]:
    """The source model trained on clean digits (saved in the run directory, reloaded when resuming)."""
    seed_everything(derive_seed(config.seed, "source", "init"))
    model = SmallCNN(10, width=config.width)
    train_set = digits("train", size=config.image_size, augment_to=config.train_augment_to, seed=config.seed)
    test_set = digits("test", size=config.image_size)
    if ctx.has_state("source"):
        tensors, info = ctx.load_state("source")
        model.load_state_dict(tensors)
        return model.to(choose_device("auto")), info  # where train() would have left it: resumed = fresh
    tc = TrainConfig(epochs=config.epochs, batch_size=64, lr=config.train_lr, schedule="cosine",
                     seed=derive_seed(config.seed, "source"), description="source model")
    train(model, train_set, tc)
    logits, _ = predict(model, digits("train", size=config.image_size))  # the clean source images
    info = {"clean_test_error": 100 * (1 - accuracy(model, test_set)),
            "anchor_threshold_rule": anchor_threshold_rule(logits.softmax(1).max(1).values)}
    ctx.save_state("source", model.state_dict(), info)
    return model, info


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


def run_method(config: CoTTAExperimentConfig, ctx: RunContext, source: nn.Module, method: str, seed: int,
               threshold: float) -> dict[str, object]:
    """Errors per domain (rounds × corruptions) of one method and seed (cached in the run directory)."""
    def compute() -> dict[str, object]:
        test_set = digits("test", size=config.image_size)
        stream = continual_stream(test_set, severity=config.severity, corruptions=config.corruptions,
                                  seed=seed, n=config.n_per_domain)
        seed_everything(derive_seed(seed, method))
        adapter = make_adapter(method, copy.deepcopy(source), config, seed, threshold)
        errors = run_stream(adapter, repeated(stream, config.rounds), config.batch_size)
        k = len(config.corruptions)
        out: dict[str, object] = {"errors": [errors[r * k:(r + 1) * k] for r in range(config.rounds)]}
        if isinstance(adapter, CoTTA):
            out["augmented_fraction"] = adapter.augmented_steps / max(adapter.step_count, 1)
        return out

    return ctx.cached(f"{method}/seed{seed}", compute)


@experiment("cotta", paper="cotta", config=CoTTAExperimentConfig,
            summary="source vs BN-adapt vs Tent vs CoTTA on 15 corruptions of digits at severity 5, repeated",
            profiles={"smoke": {"seeds": 1, "epochs": 2, "width": 8, "train_augment_to": None,
                                "n_per_domain": 32, "batch_size": 32, "rounds": 2,
                                "corruptions": ("gaussian_noise", "fog", "contrast"),
                                "n_augmentations": 4},
                      "full": {"seeds": 5, "rounds": 10, "n_per_domain": 360, "epochs": 15}})
def run(config: CoTTAExperimentConfig, ctx: RunContext) -> Results:
    source, info = source_model(config, ctx)
    threshold = info["anchor_threshold_rule"] if config.anchor_threshold is None else config.anchor_threshold
    seeds = [config.seed + k for k in range(config.seeds)]
    runs = {m: [run_method(config, ctx, source, m, s, threshold) for s in seeds] for m in config.methods}
    errors = {m: np.asarray([r["errors"] for r in rs]) for m, rs in runs.items()}  # (seeds, rounds, domains)

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

    claims = []
    means = {m: mean_std(v)[0] for m, v in first.items()}
    if set(METHODS) <= set(config.methods):
        claims.append(Claim("mean error CoTTA < Tent ≤ BN-adapt < source (round 1, severity 5)",
                            {f"error({m})": means[m] for m in METHODS},
                            means["cotta"] < means["tent"] <= means["bn_adapt"] < means["source"],
                            paper="CIFAR10-C: 16.2 < 20.7 vs 20.4 < 43.5 (so Tent > BN-adapt in the paper)"))
    if {"tent", "cotta"} <= set(config.methods) and config.rounds > 1:
        growth = {m: mean_std(per_round[m][:, -1] - per_round[m][:, 0])[0] for m in ("tent", "cotta")}
        claims.append(Claim(f"Tent's error grows over {config.rounds} rounds while CoTTA's does not "
                            "(last-round minus first-round mean error, pp)",
                            {"growth(tent)": growth["tent"], "growth(cotta)": growth["cotta"]},
                            growth["tent"] > 0 >= growth["cotta"],
                            paper="§4.2: Tent degrades over 10 rounds, CoTTA stays stable"))

    series = {LABELS[m]: v.mean(0).tolist() for m, v in per_round.items()}
    band = {LABELS[m]: v.std(0).tolist() for m, v in per_round.items()}
    ctx.savefig(plots.curves(series, band=band, x=list(range(1, config.rounds + 1)), xlabel="round",
                             ylabel="mean error (%)",
                             title=f"{len(seeds)} seeds, severity {config.severity}"),
                "error_per_round")
    how = "rule: 5% quantile of source confidence − 0.05" if config.anchor_threshold is None else "set"
    notes = [f"source model: clean test error {info['clean_test_error']:.1f}%; anchor threshold "
             f"{threshold:.3f} ({how})",
             f"{config.n_per_domain} images per corruption, batch {config.batch_size}, "
             f"{config.rounds} rounds"]
    if "cotta" in runs:
        frac = float(np.mean([r["augmented_fraction"] for r in runs["cotta"]]))
        notes.append(f"CoTTA used the augmented teacher on {100 * frac:.0f}% of the batches")
    return Results(tables={f"Error (%) per corruption, round 1, severity {config.severity}": table,
                           "Mean error (%) per round": rounds_table},
                   claims=claims, notes=notes,
                   data={"errors": {m: e.tolist() for m, e in errors.items()}, "seeds": seeds,
                         "anchor_threshold": threshold, **info})
