"""The oscillation tracker's flip-back window and code EMA, Nagel et al.'s iterative freezing, and the soft + hard
distillation of ``ofq``'s recipe: known answers on scripted codes and tiny models, and seeded loop runs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data import ArrayDataset
from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.methods.quant import (
    FreezingConfig,
    IterativeFreezing,
    OscillationConfig,
    OscillationTracker,
    QuantConfig,
    SoftHardDistillation,
    freezing_threshold,
    prepare,
)
from weightlab.models import TinyViT
from weightlab.train import TrainConfig, train


class _Scripted(nn.Module):
    """A module whose integer codes follow a script (one row per step)."""

    def __init__(self, script: list[list[float]]) -> None:
        super().__init__()
        self.script, self.t = torch.tensor(script, dtype=torch.float32), 0

    def integer_codes(self) -> Tensor:
        return self.script[self.t].clone()


def _run(script: list[list[float]], config: OscillationConfig, total: int) -> OscillationTracker:
    model = nn.Sequential()
    model.add_module("blocks", _Scripted(script))
    tracker = OscillationTracker(model, config)
    for step in range(1, len(script)):
        model.blocks.t = step
        tracker.after_step(SimpleNamespace(step=step, total_steps=total))
    return tracker


def test_window_counts_only_the_last_steps() -> None:
    # weight 0 flips back at steps 2, 3 and 4; weight 1 at step 5; weight 2 never (monotone)
    script = [[0, 0, 0], [1, 0, 1], [0, 0, 2], [1, 1, 3], [0, 1, 3], [0, 0, 3]]
    whole = _run(script, OscillationConfig(momentum=0.5), total=5)
    assert whole.window_counts() == {"blocks": (2, 4, 3)} and whole.window_steps == 5
    last2 = _run(script, OscillationConfig(momentum=0.5, window=2), total=5)  # reset after step 3
    assert last2.window_counts() == {"blocks": (2, 2, 3)} and last2.window_steps == 2
    assert last2.window_fraction() == pytest.approx(2 / 3)
    last1 = _run(script, OscillationConfig(momentum=0.5, window=1), total=5)
    assert last1.window_counts() == {"blocks": (1, 1, 3)}


def test_code_ema_known_answer() -> None:
    tracker = _run([[0.0], [2.0], [2.0]], OscillationConfig(momentum=0.5), total=2)
    torch.testing.assert_close(tracker.tracks["blocks"].code_ema, torch.tensor([1.5]))  # 0 → 1 → 1.5


def test_freezing_threshold_is_a_cosine_from_start_to_final() -> None:
    config = FreezingConfig(threshold=0.1, final_threshold=0.02)
    assert freezing_threshold(config, 0.0) == pytest.approx(0.1)
    assert freezing_threshold(config, 0.5) == pytest.approx(0.06)
    assert freezing_threshold(config, 1.0) == freezing_threshold(config, 3.0) == pytest.approx(0.02)


def _lsq_vit(seed: int = 0) -> tuple[nn.Module, ArrayDataset]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyViT(10, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2)
    data = ArrayDataset(torch.rand(64, 1, 16, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    return prepare(model, QuantConfig(bits_w=2, bits_a=None, method="lsq")).model, data


def test_iterative_freezing_holds_the_frozen_codes_in_the_loop() -> None:
    model, data = _lsq_vit()
    tracker = OscillationTracker(model, OscillationConfig(skip=("head",)))
    freezing = IterativeFreezing(tracker, FreezingConfig(threshold=1e-6, final_threshold=1e-6))
    config = TrainConfig(max_steps=30, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.5, seed=0)
    train(model, data, config, callbacks=[freezing, tracker])
    frozen = {n: m.clone() for n, m in freezing.frozen.items()}
    assert 0 < freezing.frozen_fraction[-1] < 1  # weights that flipped back (EMA > 1e-6) got frozen
    codes = {n: tracker.modules[n].integer_codes() for n in frozen}
    for n, mask in frozen.items():  # a frozen weight sits at round(EMA of its code)
        assert torch.equal(codes[n][mask], freezing.frozen_codes[n][mask])
    train(model, data, config, callbacks=[freezing, tracker])  # the step sizes keep learning
    for n, mask in frozen.items():
        assert torch.equal(tracker.modules[n].integer_codes()[mask], codes[n][mask])
        assert (freezing.frozen[n] >= mask).all()  # freezing is permanent


def test_iterative_freezing_reduces_flip_backs_against_the_same_run_without_it() -> None:
    def flipbacks(freeze: bool) -> int:
        model, data = _lsq_vit()
        tracker = OscillationTracker(model, OscillationConfig(skip=("head",)))
        cbs = [IterativeFreezing(tracker, FreezingConfig(threshold=0.005, final_threshold=0.005))] if freeze else []
        train(model, data, TrainConfig(max_steps=60, batch_size=16, lr=0.05, optimizer="adamw", seed=0),
              callbacks=[*cbs, tracker])
        return tracker.oscillations

    assert flipbacks(True) < flipbacks(False)


def test_iterative_freezing_must_precede_its_tracker_and_needs_linear_layers() -> None:
    model, data = _lsq_vit()
    tracker = OscillationTracker(model, OscillationConfig(skip=("head",)))
    config = TrainConfig(max_steps=1, batch_size=16, lr=0.01, optimizer="adamw")
    with pytest.raises(WeightlabError, match="must come before its OscillationTracker"):
        train(model, data, config, callbacks=[tracker, IterativeFreezing(tracker)])
    qkr = prepare(TinyViT(10, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2),
                  QuantConfig(bits_w=2, qkr=True)).model
    only_qk = OscillationTracker(qkr, OscillationConfig(skip=("head", "*.v", "*.proj", "*.fc*")))
    with pytest.raises(WeightlabError, match="needs QuantLinear layers"):
        IterativeFreezing(only_qk)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 0.0}, "freezing threshold must be in"), ({"final_threshold": 1.0}, "final_threshold must be"),
    ({"anneal_steps": 0}, "anneal_steps must be ≥ 1"),
])
def test_freezing_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(WeightlabError, match=message):
        FreezingConfig(**kwargs)


def test_oscillation_window_must_be_positive() -> None:
    with pytest.raises(WeightlabError, match="window must be ≥ 1"):
        OscillationConfig(window=0)


def test_soft_hard_distillation_known_answer() -> None:
    teacher = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    student_logits = torch.randn(5, 4)
    hard = F.cross_entropy(student_logits, y)
    kd = SoftHardDistillation(teacher)
    got = kd.loss(None, Batch(x, y), student_logits, hard)
    soft = -(F.softmax(teacher(x), 1) * F.log_softmax(student_logits, 1)).sum(1).mean()
    torch.testing.assert_close(got, hard + soft)
    with pytest.raises(WeightlabError, match="temperature must be > 0"):
        SoftHardDistillation(teacher, temperature=0)


def test_distillation_pulls_the_student_towards_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(8, 4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen)
    data = ArrayDataset(x, torch.randint(0, 4, (256,), generator=gen))  # labels: noise
    start = nn.Linear(8, 4)

    def agreement(kd: bool) -> float:
        student = copy.deepcopy(start)
        train(student, data, TrainConfig(max_steps=200, batch_size=32, lr=0.05, optimizer="adam", seed=0),
              callbacks=[SoftHardDistillation(teacher)] if kd else [])
        return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    assert agreement(True) > agreement(False) + 0.1
