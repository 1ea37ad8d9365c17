"""One conformance suite over every callback (DESIGN.md, Tests).

Each case trains the same seeded model on the same two experiences twice, once with the callback and once
without it, and compares what the loop did: the batches it trained on, the loss of every step and the final
weights. A method callback must change at least one of them (a callback that trains exactly as no callback
does is broken, however well it runs); an observer (``OBSERVERS``) must change none of them and must have
recorded something. A new Callback subclass fails ``test_every_callback_is_covered_and_methods_are_registered``
until it gets a case here, and one under ``weightlab.methods`` also until it is registered (kind ``"method"``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import weightlab.methods
from weightlab import registry
from weightlab.data import ArrayDataset, Batch, Experience
from weightlab.models import MLP, TinyViT
from weightlab.train import Callback, LoopState, TrainConfig, train

STEPS = 3  # per experience; EWC and the hypernetwork regulariser act from the second step of the second one


def _all_callbacks() -> set[type]:
    for module in pkgutil.walk_packages(weightlab.methods.__path__, "weightlab.methods."):
        importlib.import_module(module.name)
    importlib.import_module("weightlab.report.tensorboard")
    importlib.import_module("weightlab.experiments")  # experiments' own observers (ofq's LossCurve)

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    return {c for c in subclasses(Callback) if c.__module__.startswith("weightlab.")}


def _data(n: int = 16, size: int = 8, classes: int = 4, *, seed: int = 0) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, 1, size, size, generator=gen), torch.arange(n) % classes)


def _experiences(first: ArrayDataset | None = None, second: ArrayDataset | None = None) -> list[Experience]:
    first, second = first or _data(seed=1), second or _data(seed=2)
    classes = tuple(sorted(set(first.y.tolist())))
    return [Experience(first, first, first, classes, 0), Experience(second, second, second, classes, 1)]


@dataclass
class Case:
    model: nn.Module
    callback: Callback
    experiences: list[Experience] = field(default_factory=_experiences)
    optimizer: torch.optim.Optimizer | None = None  # kept across the experiences; default: the loop's Adam
    observed: Callable[[Callback], bool] | None = None  # only observers: did it record what it observes?


def _mlp(callback_of: Callable[[nn.Module], Callback], **kw: object) -> Case:
    model = MLP(64, 4, hidden=(8,))
    return Case(model, callback_of(model), **kw)


def _replay(tmp_path: Path) -> Case:
    from weightlab.methods.continual.replay import Replay, ReplayBuffer

    buffer = ReplayBuffer(8)
    buffer.update(_data(seed=3), generator=torch.Generator().manual_seed(0))
    return _mlp(lambda m: Replay(buffer))


def _adversarial(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining

    return _mlp(lambda m: AdversarialTraining(PGD(eps=0.1, steps=1)))


def _trades(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.trades import PGD, TRADES

    return _mlp(lambda m: TRADES(PGD(eps=0.1, steps=1)))


def _mart(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.mart import MART, PGD

    return _mlp(lambda m: MART(PGD(eps=0.1, steps=1)))


def _done(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.attacks import PGD
    from weightlab.methods.done.dro import DONE, DONEConfig

    return _mlp(lambda m: DONE(PGD(eps=0.1, steps=1), DONEConfig(r=0.5)))


def _gairat(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.attacks import PGD
    from weightlab.methods.done.baselines import GAIRAT, GAIRATConfig

    return _mlp(lambda m: GAIRAT(PGD(eps=0.1, steps=2), GAIRATConfig(lam=0.0, burn_in=0.0)))


def _mail(tmp_path: Path) -> Case:
    from weightlab.methods.adversarial.attacks import PGD
    from weightlab.methods.done.baselines import MAIL, MAILConfig

    return _mlp(lambda m: MAIL(PGD(eps=0.1, steps=1), MAILConfig(gamma=10.0, beta=0.0, burn_in=0.0)))


def _ewc(tmp_path: Path) -> Case:
    from weightlab.methods.continual.ewc import EWC, EWCConfig

    return _mlp(lambda m: EWC(m, EWCConfig(lam=100.0, fisher_samples=8)))


def _kd(tmp_path: Path) -> Case:
    from weightlab.methods.weight_aligning.aligning import KnowledgeDistillation, frozen_copy

    return _mlp(lambda m: KnowledgeDistillation(frozen_copy(m), 2))


def _icarl(tmp_path: Path) -> Case:
    from weightlab.methods.weight_aligning.aligning import ICaRLLoss, frozen_copy

    return _mlp(lambda m: ICaRLLoss(frozen_copy(m), 2))


def _clip(tmp_path: Path) -> Case:
    from weightlab.methods.weight_aligning.aligning import ClipHeadWeights

    return _mlp(lambda m: ClipHeadWeights(m.head))


def _align(tmp_path: Path) -> Case:
    from weightlab.methods.weight_aligning.aligning import AlignHead

    return _mlp(lambda m: AlignHead(m.head, 2))


def _group_masking(tmp_path: Path) -> Case:
    from weightlab.methods.scole.strategies import GroupMasking

    two_of_four = _data(classes=2, seed=1), _data(classes=2, seed=2)  # classes 2 and 3 are absent: masked
    return _mlp(lambda m: GroupMasking(), experiences=_experiences(*two_of_four))


def _collect_samples(tmp_path: Path) -> Case:
    from weightlab.methods.universality.sgld import CollectSamples

    return _mlp(lambda m: CollectSamples(), observed=lambda cb: len(cb.samples) == 2 * STEPS)


def _tensorboard(tmp_path: Path) -> Case:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is installed by `make test`")
    from weightlab.report.tensorboard import TensorBoardLogger

    def wrote_events(cb: Callback) -> bool:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        cb.close()
        return len(EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss")) == 2 * STEPS

    return _mlp(lambda m: TensorBoardLogger(tmp_path, every=1), observed=wrote_events)


def _binary(which: str) -> Callable[[Path], Case]:
    def case(tmp_path: Path) -> Case:
        from weightlab.methods.binary_cl.variational import (
            BetaAnnealing,
            ConsolidateField,
            VariationalBinaryMLP,
            VariationalConfig,
            VariationalFieldAdam,
            binary_layers,
        )

        model = VariationalBinaryMLP(64, 4, hidden=(8,))
        config = VariationalConfig(prior="task")  # the task prior is what ConsolidateField sets
        optimizer = VariationalFieldAdam(binary_layers(model), config)
        callback = (BetaAnnealing(model, config, n_tasks=2, epochs=1) if which == "beta"
                    else ConsolidateField(optimizer))
        return Case(model, callback, optimizer=optimizer)

    return case


def _hypernet(tmp_path: Path) -> Case:
    from weightlab.methods.hypernet.hypernetworks import HyperModel, MLPHyperNet, OutputRegularizer

    target = MLP(64, 4, hidden=(4,))
    model = HyperModel(target, MLPHyperNet(sum(p.numel() for p in target.parameters())))
    model.hnet.add_task()
    model.hnet.add_task()
    first, second = (d.with_task(t) for t, d in enumerate((_data(seed=1), _data(seed=2))))
    return Case(model, OutputRegularizer(model), experiences=_experiences(first, second))


def _quant(which: str) -> Callable[[Path], Case]:
    def case(tmp_path: Path) -> Case:
        from weightlab.methods.quant.api import QuantConfig, prepare
        from weightlab.methods.quant.cga import CGAConfig, ConfidenceGuidedAnnealing
        from weightlab.methods.quant.oscillation import OscillationTracker

        vit = TinyViT(4, image_size=8, patch_size=4, dim=8, depth=1, num_heads=2)
        model = prepare(vit, QuantConfig(bits_w=2)).model
        if which == "osc":
            return Case(model, OscillationTracker(model), observed=lambda cb: len(cb.history) == 2 * STEPS)
        return Case(model, ConfidenceGuidedAnnealing(model, CGAConfig(boundary_range=0.05)))

    return case


def _freezing(tmp_path: Path) -> Case:
    from weightlab.methods.quant import FreezingConfig, IterativeFreezing, OscillationTracker, QuantConfig, prepare

    vit = TinyViT(4, image_size=8, patch_size=4, dim=8, depth=1, num_heads=2)
    model = prepare(vit, QuantConfig(bits_w=2, method="lsq")).model
    tracker = OscillationTracker(model)
    tracker.tracks["blocks.0.mlp.fc1"].ema[0] = 1.0  # one row has oscillated: it is frozen at the first step
    return Case(model, IterativeFreezing(tracker, FreezingConfig()))


def _soft_hard_kd(tmp_path: Path) -> Case:
    from weightlab.methods.quant.distill import SoftHardDistillation

    return _mlp(lambda m: SoftHardDistillation(MLP(64, 4, hidden=(8,))))


def _loss_curve(tmp_path: Path) -> Case:
    from weightlab.experiments._ofq import LossCurve

    return _mlp(lambda m: LossCurve(2), observed=lambda cb: len(cb.curve) == STEPS)


CASES: dict[str, Callable[[Path], Case]] = {
    "Replay": _replay, "AdversarialTraining": _adversarial, "DONE": _done, "EWC": _ewc,
    "KnowledgeDistillation": _kd, "ICaRLLoss": _icarl, "ClipHeadWeights": _clip, "AlignHead": _align,
    "GroupMasking": _group_masking, "TRADES": _trades, "MART": _mart,
    "GAIRAT": _gairat, "MAIL": _mail,
    "CollectSamples": _collect_samples, "TensorBoardLogger": _tensorboard,
    "BetaAnnealing": _binary("beta"), "ConsolidateField": _binary("consolidate"),
    "OutputRegularizer": _hypernet, "OscillationTracker": _quant("osc"),
    "ConfidenceGuidedAnnealing": _quant("cga"), "IterativeFreezing": _freezing,
    "SoftHardDistillation": _soft_hard_kd, "LossCurve": _loss_curve,
}
OBSERVERS = {"CollectSamples", "OscillationTracker", "TensorBoardLogger", "LossCurve"}  # they watch, never change


class Recorder(Callback):
    """Runs after the callback under test: what each step trained on and the loss it reached."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int], Tensor]] = []
        self.losses: list[float] = []

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        self.batches.append((len(batch), batch.y.tolist(), batch.x.detach().clone()))
        return batch

    def after_step(self, state: LoopState) -> None:
        self.losses.append(state.loss.item())


@dataclass
class Run:
    case: Case
    recorder: Recorder
    weights: dict[str, Tensor]


def _run(name: str, tmp_path: Path, *, with_callback: bool) -> Run:
    torch.manual_seed(0)  # both runs build the same model, data and memory
    case = CASES[name](tmp_path)
    assert type(case.callback).__name__ == name
    recorder = Recorder()
    callbacks = [case.callback, recorder] if with_callback else [recorder]
    config = TrainConfig(batch_size=8, max_steps=STEPS, lr=0.01, optimizer="adam", seed=0, device="cpu")
    for exp in case.experiences:  # a case's optimizer (if any) carries over, as the callbacks do
        state = train(case.model, exp.train, config, callbacks=callbacks, experience=exp, optimizer=case.optimizer)
        assert state.step == STEPS
    weights = {k: v.detach().clone() for k, v in case.model.state_dict().items()}
    return Run(case, recorder, weights)


def _differences(a: Run, b: Run) -> set[str]:
    out = set()
    if len(a.recorder.batches) != len(b.recorder.batches) or any(
        n != m or y != z or not torch.equal(x, w)
        for (n, y, x), (m, z, w) in zip(a.recorder.batches, b.recorder.batches)
    ):
        out.add("batches")
    if a.recorder.losses != b.recorder.losses:
        out.add("losses")
    if a.weights.keys() != b.weights.keys() or any(not torch.equal(v, b.weights[k]) for k, v in a.weights.items()):
        out.add("weights")
    return out


def test_every_callback_is_covered_and_methods_are_registered():
    callbacks = _all_callbacks()
    assert {c.__name__ for c in callbacks} == set(CASES)
    assert OBSERVERS <= set(CASES)
    registered = {registry.get("method", name) for name in registry.names("method")}
    unregistered = {c.__name__ for c in callbacks if c.__module__.startswith("weightlab.methods.")} - {
        c.__name__ for c in registered if isinstance(c, type)}
    assert unregistered == set(), "register them: @register('method', name) beside their code"


@pytest.mark.parametrize("name", sorted(set(CASES) - OBSERVERS))
def test_callback_changes_training(name, tmp_path):
    with_cb = _run(name, tmp_path, with_callback=True)
    without = _run(name, tmp_path / "without", with_callback=False)
    assert all(torch.isfinite(torch.tensor(with_cb.recorder.losses)))
    assert all(torch.isfinite(v).all() for v in with_cb.weights.values() if v.is_floating_point())
    assert _differences(with_cb, without), f"{name} trained exactly as a run without it"


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_records_without_changing_training(name, tmp_path):
    with_cb = _run(name, tmp_path, with_callback=True)
    without = _run(name, tmp_path / "without", with_callback=False)
    assert _differences(with_cb, without) == set()
    observed = with_cb.case.observed
    assert observed is not None and observed(with_cb.case.callback)


def test_differences_sees_a_single_changed_weight(tmp_path):
    """The comparison itself: identical runs compare equal, one nudged weight does not."""
    a = _run("EWC", tmp_path, with_callback=False)
    b = _run("EWC", tmp_path, with_callback=False)
    assert _differences(a, b) == set()
    key = next(iter(b.weights))
    b.weights[key] = b.weights[key].clone()
    b.weights[key].view(-1)[0] += 1e-6
    assert _differences(a, b) == {"weights"}
    b.recorder.losses[-1] += 1.0
    assert _differences(a, b) == {"weights", "losses"}
