"""One conformance suite over every callback method (DESIGN.md, Tests): each runs training steps of the one
loop on tiny fixtures and leaves finite weights. A new Callback subclass fails ``test_every_callback_is_covered``
until it gets a factory here."""

from __future__ import annotations

import copy
import importlib
import pkgutil

import pytest
import torch

import weightlab.methods
from weightlab.data import ArrayDataset, Experience
from weightlab.models import MLP, TinyViT
from weightlab.train import Callback, TrainConfig, train


def _all_callbacks() -> set[str]:
    for module in pkgutil.walk_packages(weightlab.methods.__path__, "weightlab.methods."):
        importlib.import_module(module.name)
    importlib.import_module("weightlab.report.tensorboard")

    def subclasses(cls: type) -> list[type]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    return {c.__name__ for c in subclasses(Callback) if c.__module__.startswith("weightlab.")}


def _digits_like(n: int = 16, size: int = 8, classes: int = 4, *, task: int | None = None) -> ArrayDataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    t = None if task is None else torch.full((n,), task)
    return ArrayDataset(torch.rand(n, 1, size, size, generator=gen), y, t)


def _mlp_case(callback_of) -> dict:
    model = MLP(64, 4, hidden=(8,))
    data = _digits_like()
    return {"model": model, "data": data, "callback": callback_of(model),
            "experience": Experience(data, data, data, (0, 1, 2, 3), 0)}


def _replay():
    from weightlab.methods.continual.replay import Replay, ReplayBuffer

    buffer = ReplayBuffer(8)
    buffer.update(_digits_like(), generator=torch.Generator().manual_seed(0))
    return _mlp_case(lambda m: Replay(buffer))


def _adversarial():
    from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining

    return _mlp_case(lambda m: AdversarialTraining(PGD(eps=0.1, steps=1)))


def _done():
    from weightlab.methods.adversarial.attacks import PGD
    from weightlab.methods.done.dro import DONE, DONEConfig

    return _mlp_case(lambda m: DONE(DONEConfig(), PGD(eps=0.1, steps=1)))


def _ewc():
    from weightlab.methods.continual.ewc import EWC, EWCConfig

    return _mlp_case(lambda m: EWC(m, EWCConfig(fisher_samples=8)))


def _kd():
    from weightlab.methods.weight_aligning.aligning import KnowledgeDistillation

    return _mlp_case(lambda m: KnowledgeDistillation(copy.deepcopy(m), 2))


def _clip():
    from weightlab.methods.weight_aligning.aligning import ClipHeadWeights

    return _mlp_case(lambda m: ClipHeadWeights(m.head))


def _align():
    from weightlab.methods.weight_aligning.aligning import AlignHead

    return _mlp_case(lambda m: AlignHead(m.head, 2))


def _group_masking():
    from weightlab.methods.scole.strategies import GroupMasking

    return _mlp_case(lambda m: GroupMasking())


def _collect_samples():
    from weightlab.methods.universality.sgld import CollectSamples

    return _mlp_case(lambda m: CollectSamples())


def _tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is installed by `make test`")
    from weightlab.report.tensorboard import TensorBoardLogger

    return _mlp_case(lambda m: TensorBoardLogger(tmp_path, every=1))


def _binary(which: str):
    from weightlab.methods.binary_cl.variational import (
        BetaAnnealing,
        ConsolidateField,
        VariationalBinaryMLP,
        VariationalFieldAdam,
        binary_layers,
    )

    model = VariationalBinaryMLP(64, 4, hidden=(8,))
    optimizer = VariationalFieldAdam(binary_layers(model))
    callback = (BetaAnnealing(model, n_tasks=1, epochs=1) if which == "beta" else ConsolidateField(optimizer))
    data = _digits_like()
    return {"model": model, "data": data, "callback": callback, "optimizer": optimizer,
            "experience": Experience(data, data, data, (0, 1, 2, 3), 0)}


def _hypernet():
    from weightlab.methods.hypernet.hypernetworks import HyperModel, MLPHyperNet, OutputRegularizer

    target = MLP(64, 4, hidden=(4,))
    model = HyperModel(target, MLPHyperNet(sum(p.numel() for p in target.parameters())))
    model.hnet.add_task()
    model.hnet.add_task()
    data = _digits_like(task=1)
    return {"model": model, "data": data, "callback": OutputRegularizer(model),
            "experience": Experience(data, data, data, (0, 1, 2, 3), 1)}


def _quant(which: str):
    from weightlab.methods.quant.api import QuantConfig, prepare
    from weightlab.methods.quant.cga import ConfidenceGuidedAnnealing
    from weightlab.methods.quant.oscillation import OscillationTracker

    model = prepare(TinyViT(4, image_size=8, patch_size=4, dim=8, depth=1, num_heads=2), QuantConfig(bits_w=2))
    callback = OscillationTracker(model) if which == "osc" else ConfidenceGuidedAnnealing(model)
    data = _digits_like()
    return {"model": model, "data": data, "callback": callback,
            "experience": Experience(data, data, data, (0, 1, 2, 3), 0)}


CASES = {
    "Replay": _replay, "AdversarialTraining": _adversarial, "DONE": _done, "EWC": _ewc,
    "KnowledgeDistillation": _kd, "ClipHeadWeights": _clip, "AlignHead": _align, "GroupMasking": _group_masking,
    "CollectSamples": _collect_samples, "TensorBoardLogger": _tensorboard,
    "BetaAnnealing": lambda: _binary("beta"), "ConsolidateField": lambda: _binary("consolidate"),
    "OutputRegularizer": _hypernet, "OscillationTracker": lambda: _quant("osc"),
    "ConfidenceGuidedAnnealing": lambda: _quant("cga"),
}


def test_every_callback_is_covered():
    assert _all_callbacks() == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_runs_steps_of_the_one_loop(name, tmp_path):
    factory = CASES[name]
    case = factory(tmp_path) if name == "TensorBoardLogger" else factory()
    model, data, callback = case["model"], case["data"], case["callback"]
    assert type(callback).__name__ == name
    config = TrainConfig(batch_size=8, max_steps=2, lr=0.01, optimizer="adam", seed=0, device="cpu")
    state = train(model, data, config, callbacks=[callback], experience=case["experience"],
                  optimizer=case.get("optimizer"))
    assert state.step == 2 and all(torch.isfinite(torch.tensor(loss)) for loss in state.epoch_losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
