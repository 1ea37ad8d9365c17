"""The training runs of the ``ofq`` experiment (paper key ``ofq``): the data splits, the full-precision
teacher, and the QAT arms, each with the same two phases (a cosine QAT phase, then a constant-LR phase in
which CGA acts for its arm). Kept apart from :mod:`.ofq` (config, claims, tables) to keep both short."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from weightlab.data import ArrayDataset, load_dataset
from weightlab.methods.quant.act import OfqActQuantizer
from weightlab.methods.quant.api import QuantConfig, prepare
from weightlab.methods.quant.cga import CGAConfig, ConfidenceGuidedAnnealing
from weightlab.methods.quant.distill import SoftHardDistillation
from weightlab.methods.quant.freezing import FreezingConfig, IterativeFreezing
from weightlab.methods.quant.oscillation import OscillationConfig, OscillationTracker
from weightlab.models import TinyViT
from weightlab.train import TrainConfig, train
from weightlab.train.callbacks import Callback
from weightlab.train.evaluate import accuracy
from weightlab.utils import derive_seed

if TYPE_CHECKING:
    from weightlab.experiments.ofq import OfqConfig
    from weightlab.runs import TrialContext
    from weightlab.train.loop import LoopState


@dataclass(frozen=True)
class Arm:
    """One QAT arm: its weight quantizer, QKR, Nagel et al.'s freezing, CGA in the last phase, and whether its
    activations use OFQ's quantizer (the config's ``act_granularity`` / ``act_shift``) or per-tensor LSQ."""

    method: str
    qkr: bool = False
    freezing: bool = False
    cga: bool = False
    act: bool = False

    @property
    def unit(self) -> str:
        """The arms that share a first phase (StatsQ + QKR with and without CGA) share this key."""
        return (f"{self.method}{'+qkr' if self.qkr else ''}{'+freezing' if self.freezing else ''}"
                f"{'+act' if self.act else ''}")


ARMS = {"lsq": Arm("lsq"), "lsq+freezing": Arm("lsq", freezing=True), "statsq": Arm("statsq"),
        "statsq+qkr": Arm("statsq", qkr=True), "statsq+qkr+cga": Arm("statsq", qkr=True, cga=True),
        "statsq+qkr+act": Arm("statsq", qkr=True, act=True),
        "statsq+qkr+cga+act": Arm("statsq", qkr=True, cga=True, act=True)}


def quant_config(config: OfqConfig, bits: int, arm: Arm) -> QuantConfig:
    """The arm's :class:`QuantConfig` at ``bits``: OFQ's activation quantizer for the ``+act`` arms."""
    act = {"act_granularity": config.act_granularity, "act_shift": config.act_shift} if arm.act else {}
    return QuantConfig(bits_w=bits, bits_a=bits, method=arm.method, qkr=arm.qkr, **act)


def splits(config: OfqConfig) -> tuple[ArrayDataset, ArrayDataset, ArrayDataset]:
    """``(train, val, test)``: ``n_val`` training images held out by a fixed permutation (seed 0, the same
    for every trial), the rest (the first ``n_train`` of them, if set) to train on; the official test split."""
    full = load_dataset(config.data, "train", size=config.image_size)
    test = load_dataset(config.data, "test", size=config.image_size)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    rest = order[config.n_val:]
    if config.n_train is not None:
        rest = rest[:config.n_train]
    return full.subset(rest), full.subset(order[:config.n_val]), test


def vit(config: OfqConfig) -> TinyViT:
    return TinyViT(10, image_size=config.image_size, patch_size=config.patch_size, dim=config.dim,
                   depth=config.depth, num_heads=config.heads)


class LossCurve(Callback):
    """Records the mean training loss of every block of ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.curve, self._sum, self._n = every, [], 0.0, 0

    def after_step(self, state: LoopState) -> None:
        self._sum += float(state.loss)
        self._n += 1
        if self._n == self.every:
            self.curve.append(self._sum / self._n)
            self._sum, self._n = 0.0, 0


def fp_teacher(config: OfqConfig, ctx: TrialContext, data: tuple[ArrayDataset, ...]) -> tuple[TinyViT, dict]:
    """The seed's full-precision model (trained once, checkpointed) and its convergence diagnostics."""
    train_set, val_set, test_set = data
    ctx.seeded("fp", "init")
    model = vit(config)
    curve = LossCurve(max(config.fp_steps // 20, 1))

    def fit() -> dict[str, Any]:
        tc = TrainConfig(max_steps=config.fp_steps, batch_size=config.batch_size, lr=config.fp_lr,
                         optimizer="adamw", weight_decay=config.weight_decay, schedule="cosine",
                         warmup_steps=config.fp_steps // 20, seed=derive_seed(ctx.seed, "fp"),
                         description=f"FP seed {ctx.seed}")
        train(model, train_set, tc, callbacks=[curve])
        return {"loss_curve": curve.curve}

    fitted = ctx.fitted("fp", {"model": model}, fit)
    seen = train_set.subset(torch.arange(min(len(train_set), len(test_set))))
    scores = ctx.cached("fp-acc", lambda: {"train_acc": accuracy(model, seen), "val_acc": accuracy(model, val_set),
                                           "test_acc": accuracy(model, test_set)})
    return model, {**fitted, **scores}


def module_kind(name: str) -> str:
    """``blocks.3.mlp.fc1`` → ``mlp.fc1``; a QKR attention module (its ``W_qk``) → ``attn.qk``."""
    kind = re.sub(r"^blocks\.\d+\.", "", name)
    return "attn.qk" if kind == "attn" else kind


def _phase(config: OfqConfig, *, steps: int, lr: float, cosine: bool, seed: int, what: str) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=config.batch_size, lr=lr, optimizer="adamw",
                       weight_decay=config.weight_decay, schedule="cosine" if cosine else "constant",
                       warmup_steps=steps // 10 if cosine else 0, seed=seed, description=what)


def _summary(model: nn.Module, tracker: OscillationTracker, test_set: ArrayDataset, *,
             phase2: dict[str, float]) -> dict[str, Any]:
    """What summarise needs of one finished arm (JSON-able)."""
    kinds: dict[str, list[int]] = {}
    for name, (osc, flips, numel) in tracker.window_counts().items():
        entry = kinds.setdefault(module_kind(name), [0, 0, 0])
        entry[0], entry[1], entry[2] = entry[0] + osc, entry[1] + flips, entry[2] + numel
    counts = np.sum(list(kinds.values()), axis=0)
    return {"acc": accuracy(model, test_set), "osc": float(counts[0] / counts[2]),
            "flipbacks": float(counts[1] / counts[2] / max(tracker.window_steps, 1)),
            "per_module": {k: v[0] / v[2] for k, v in kinds.items()},
            "ema_osc": tracker.oscillating_fraction(), "ema_freq": tracker.mean_frequency(),
            "steps": tracker.steps, "window_steps": tracker.window_steps,
            "history": [h[1] for h in tracker.history], **phase2}


def _phase2(model: nn.Module, tracker: OscillationTracker, data: ArrayDataset, config: TrainConfig,
            callbacks: list[Callback]) -> dict[str, float]:
    """Run the last phase; return its code-change diagnostics (per step, and start vs end) and the mean
    training loss of its final ``window`` steps."""
    before = {n: m.integer_codes() for n, m in tracker.modules.items()}
    flips = tracker.flips
    curve = LossCurve(tracker.config.window or config.max_steps)
    train(model, data, config, callbacks=[*callbacks, curve])
    changed = sum(int((m.integer_codes() != before[n]).sum()) for n, m in tracker.modules.items())
    n = tracker.num_weights()
    return {"phase2_change_rate": (tracker.flips - flips) / n / config.max_steps, "phase2_changed": changed / n,
            "final_loss": curve.curve[-1]}


def run_unit(config: OfqConfig, ctx: TrialContext, fp: nn.Module, bits: int, unit: str,
             data: tuple[ArrayDataset, ...]) -> dict[str, dict[str, Any]]:
    """QAT from ``fp`` for the arms of ``unit`` (one first phase; the arms that share it branch after it)."""
    train_set, _, test_set = data
    arms = {name: arm for name, arm in ARMS.items() if arm.unit == unit and name in config.methods}
    first = next(iter(arms.values()))
    seed = ctx.seeded(bits, unit)
    model = prepare(copy.deepcopy(fp), quant_config(config, bits, first)).model
    osc = OscillationConfig(threshold=config.osc_threshold, skip=("head",), window=config.osc_window,
                            record_every=config.osc_record_every)
    tracker = OscillationTracker(model, osc)

    def teacher() -> list[Callback]:
        return [SoftHardDistillation(fp)] if config.kd else []

    freezing = ([IterativeFreezing(tracker, FreezingConfig(threshold=config.freeze_threshold,
                                                           final_threshold=config.freeze_final_threshold,
                                                           anneal_steps=config.qat_steps))]
                if first.freezing else [])
    qat = _phase(config, steps=config.qat_steps, lr=config.qat_lr, cosine=True, seed=seed,
                 what=f"W{bits}A{bits} {unit}")
    train(model, train_set, qat, callbacks=[*teacher(), *freezing, tracker])
    last = _phase(config, steps=config.cga_steps, lr=config.cga_lr, cosine=False, seed=seed + 1,
                  what=f"W{bits}A{bits} {unit} last phase")
    out = {}
    for i, (name, arm) in enumerate(arms.items()):
        m, t = (model, tracker) if i == len(arms) - 1 else copy.deepcopy((model, tracker))
        cga = [ConfidenceGuidedAnnealing(m, CGAConfig(boundary_range=config.boundary_range, lr=config.cga_lr))
               ] if arm.cga else []
        phase2 = _phase2(m, t, train_set, last, [*teacher(), *cga, *freezing, t])
        out[name] = _summary(m, t, test_set, phase2=phase2)
        if cga:
            out[name]["trainable"] = float(np.mean(cga[0].trainable_fraction))
        if freezing:
            out[name]["frozen"] = freezing[0].frozen_fraction[-1]
        if arm.act:
            out[name].update(act_diagnostics(m))
    return out


@torch.no_grad()
def act_diagnostics(model: nn.Module) -> dict[str, float]:
    """Whether OFQ's activation options did anything: the mean ratio of the largest to the smallest per-token
    step of a quantizer, and the mean |shift| in units of its quantizer's mean step (0 without them)."""
    spread, shift = [], []
    for m in model.modules():
        if not isinstance(m, OfqActQuantizer):
            continue
        step = m.step.clamp_min(1e-5)
        if m.per_token:
            spread.append(float(step.max() / step.min()))
        if m.shift is not None:
            shift.append(float(m.shift.abs().mean() / step.mean()))
    return {"act_step_spread": float(np.mean(spread)) if spread else 1.0,
            "act_shift_steps": float(np.mean(shift)) if shift else 0.0}
