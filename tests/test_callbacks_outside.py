"""Callbacks outside the weightlab loop: the manual protocol (CallbackRunner) and the Hugging Face Trainer
adapter (WeightlabCallback) give the weights train() gives, for the oscillation tracker, CGA and EWC."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weightlab.data import ArrayDataset, Batch, Experience
from weightlab.errors import WeightlabError
from weightlab.integrations.hooks import CallbackRunner
from weightlab.methods.continual.ewc import EWC, EWCConfig
from weightlab.methods.quant import (
    CGAConfig,
    ConfidenceGuidedAnnealing,
    OscillationConfig,
    OscillationTracker,
    QuantConfig,
    prepare,
)
from weightlab.models import TinyViT
from weightlab.train import Callback, TrainConfig, train
from weightlab.train.loop import clip_gradients, make_optimizer

CONFIG = TrainConfig(max_steps=4, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.0, grad_clip=1.0, amp=False,
                     seed=3)


def data(n: int = 32) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def experience() -> Experience:
    return Experience(data(), data(), data(), (0, 1, 2, 3), 0)


def quantized() -> nn.Module:
    torch.manual_seed(0)
    return prepare(TinyViT(4, image_size=8, patch_size=4, dim=8, depth=1, num_heads=2), QuantConfig(bits_w=2)).model


def callbacks(model: nn.Module, consolidated: EWC | None = None) -> list[Callback]:
    """The tracker, CGA, and an EWC whose Fisher and anchor are those of ``consolidated`` (if given)."""
    ewc = EWC(model, EWCConfig(lam=50.0, fisher_samples=4))
    if consolidated is not None:
        ewc.load_state_dict(consolidated.state_dict())
    tracker = OscillationTracker(model, OscillationConfig(skip=("head",)))
    return [tracker, ConfidenceGuidedAnnealing(model, CGAConfig(0.05)), ewc]


def consolidated_ewc(model: nn.Module) -> EWC:
    ewc = EWC(copy.deepcopy(model), EWCConfig(lam=50.0, fisher_samples=4))
    ewc.on_experience_end(type("S", (), {"experience": experience()})())
    return ewc


def manual_loop(model: nn.Module, cbs: list[Callback], config: TrainConfig) -> CallbackRunner:
    """A plain PyTorch loop following the documented protocol (docs/callbacks.md)."""
    optimizer = make_optimizer(model.parameters(), config)
    runner = CallbackRunner(model, optimizer, cbs, config=config, seed=config.seed, experience=experience())
    generator = torch.Generator().manual_seed(config.seed)  # the order train() draws batches in
    runner.experience_start()
    model.train()
    while runner.state.step < config.max_steps:  # type: ignore[operator]
        for batch in data().batches(config.batch_size, shuffle=True, generator=generator):
            batch = runner.batch(batch)
            logits = runner.logits(batch, model(batch.x))
            loss = runner.loss(batch, logits, F.cross_entropy(logits, batch.y, reduction="none"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            runner.after_backward()
            clip_gradients(model, optimizer, config.grad_clip)  # type: ignore[arg-type]
            optimizer.step()
            runner.after_step(loss)
            if runner.state.step == config.max_steps:
                break
    runner.experience_end()
    return runner


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_the_manual_protocol_gives_the_weights_of_the_loop() -> None:
    base = quantized()
    ewc = consolidated_ewc(base)
    ref, mine = copy.deepcopy(base), copy.deepcopy(base)
    ref_cbs, my_cbs = callbacks(ref, ewc), callbacks(mine, ewc)
    train(ref, data(), CONFIG, callbacks=ref_cbs, experience=experience())
    runner = manual_loop(mine, my_cbs, CONFIG)
    assert runner.state.step == 4
    assert_same(ref, mine)
    assert my_cbs[0].history == ref_cbs[0].history and len(ref_cbs[0].history) == 4  # type: ignore[attr-defined]
    assert my_cbs[1].trainable_fraction == ref_cbs[1].trainable_fraction  # type: ignore[attr-defined]
    without = copy.deepcopy(base)
    train(without, data(), CONFIG)
    assert not torch.equal(without.blocks[0].mlp.fc1.weight, ref.blocks[0].mlp.fc1.weight)  # they acted


def test_the_tracker_needs_no_undocumented_hook_in_a_plain_loop() -> None:
    model = quantized()
    tracker = OscillationTracker(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for batch in data().batches(8):
        F.cross_entropy(model(batch.x), batch.y).backward()
        optimizer.step()
        optimizer.zero_grad()
        tracker.after_step(None)  # before: KeyError 'blocks.0.attn' without on_experience_start(None)
    assert tracker.steps == 4 and len(tracker.history) == 4 and tracker.flips > 0


def test_runner_refuses_what_is_not_a_callback() -> None:
    with pytest.raises(WeightlabError, match="expected weightlab Callback objects, got function"):
        CallbackRunner(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1), [lambda s: s])  # type: ignore[list-item]
    runner = CallbackRunner(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1), [])
    assert runner.loss(Batch(torch.zeros(2, 2), torch.zeros(2)), torch.zeros(2, 2), torch.tensor([1.0, 3.0])) == 2.0


# ---------------------------------------------------------------------------------------------- HF Trainer


class ForTrainer(nn.Module):
    """A Trainer-style model: ``forward(x, labels)`` returns the loss the weightlab loop computes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels, reduction="none").mean(), "logits": logits}


def trainer_examples(config: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The samples in the order train() batches them (one permutation per epoch), for a sequential sampler."""
    generator = torch.Generator().manual_seed(config.seed)
    d = data()
    out = []
    for _ in range(2):
        out += [{"x": d.x[i], "labels": d.y[i]} for i in torch.randperm(len(d), generator=generator).tolist()]
    return out


def hf_train(model: nn.Module, cbs: list[Callback], tmp_path, **kwargs: object) -> None:
    from transformers import Trainer, TrainingArguments

    from weightlab.integrations.hf import WeightlabCallback

    class Sequential(Trainer):
        def _get_train_sampler(self, *args, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=CONFIG.max_steps, report_to=[],
                             per_device_train_batch_size=CONFIG.batch_size, save_strategy="no",
                             logging_strategy="no", use_cpu=True, lr_scheduler_type="constant",
                             max_grad_norm=CONFIG.grad_clip, dataloader_drop_last=False, **kwargs)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=CONFIG.lr)
    wrapped = ForTrainer(model)
    Sequential(model=wrapped, args=args, train_dataset=trainer_examples(CONFIG), optimizers=(sgd, None),
               callbacks=[WeightlabCallback(*cbs, experience=experience())]).train()
    assert args.max_grad_norm == CONFIG.grad_clip  # taken over for the run, then restored


def test_the_trainer_adapter_gives_the_weights_of_the_loop(tmp_path) -> None:
    pytest.importorskip("transformers")
    base = quantized()
    ewc = consolidated_ewc(base)
    ref, mine = copy.deepcopy(base), copy.deepcopy(base)
    ref_cbs, my_cbs = callbacks(ref, ewc), callbacks(mine, ewc)
    train(ref, data(), CONFIG, callbacks=ref_cbs, experience=experience())
    hf_train(mine, my_cbs, tmp_path)
    assert_same(ref, mine)
    assert my_cbs[0].history == ref_cbs[0].history  # type: ignore[attr-defined]
    assert torch.equal(my_cbs[2].fisher["blocks.0.mlp.fc1.weight"], ref_cbs[2].fisher["blocks.0.mlp.fc1.weight"])


def test_the_trainer_adapter_refuses_batch_hooks() -> None:
    pytest.importorskip("transformers")
    from weightlab.integrations.hf import WeightlabCallback
    from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining

    with pytest.raises(WeightlabError, match="AdversarialTraining overrides on_batch, which a Trainer callback"):
        WeightlabCallback(AdversarialTraining(PGD()))
