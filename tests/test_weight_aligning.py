"""Weight Aligning: known answers for KD, γ, herding and NME; callbacks; the learner; the experiment."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from weightlab.cli import main
from weightlab.data import ArrayDataset
from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.experiments.base import run_experiment
from weightlab.methods.continual.exemplars import NearestMeanClassifier, class_means, herding
from weightlab.methods.continual.replay import ReplayBuffer
from weightlab.methods.weight_aligning.aligning import (
    ClassIncrementalLearner,
    ClipHeadWeights,
    KnowledgeDistillation,
    WAConfig,
    align_rows,
    expand_head,
    kd_loss,
    weight_align,
)
from weightlab.models import MLP, ExpandableHead
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, train


class Identity(nn.Module):
    """A 'model' whose features are its inputs (for NME known answers)."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------- formulas


def test_kd_loss_known_answer_no_t_squared() -> None:
    student = torch.tensor([[0.0, 2 * math.log(3.0)]])  # /T = [0, ln 3] -> softmax [1/4, 3/4]
    teacher = torch.tensor([[0.0, 0.0]])  # softmax [1/2, 1/2]
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # mean over the batch, sum over classes
    two = kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]))
    assert two.item() == pytest.approx((expected + math.log(2.0)) / 2, rel=1e-6)


def test_kd_loss_errors() -> None:
    with pytest.raises(WeightlabError, match=r"same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(WeightlabError, match=r"temperature must be > 0, got 0"):
        kd_loss(torch.zeros(2, 2), torch.zeros(2, 2), temperature=0)


def test_align_rows_known_answer() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 5.0], [6.0, 8.0], [0.0, 20.0]])  # norms 5, 5 | 10, 20
    gamma, aligned = align_rows(w, 2)
    assert gamma == pytest.approx(5.0 / 15.0)
    assert torch.allclose(aligned, torch.tensor([[3.0, 4.0], [0.0, 5.0], [2.0, 8 / 3], [0.0, 20 / 3]]))
    assert torch.equal(w[2], torch.tensor([6.0, 8.0]))  # input untouched
    assert aligned[2:].norm(dim=1).mean().item() == pytest.approx(aligned[:2].norm(dim=1).mean().item())


def test_weight_align_head_leaves_input_and_bias() -> None:
    head = ExpandableHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 20.0]]))
        head.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    gamma, aligned = weight_align(head, 1)
    assert gamma == pytest.approx(5.0 / 15.0)
    assert torch.equal(head.weight[1], torch.tensor([6.0, 8.0]))
    assert torch.equal(aligned.bias, head.bias)
    _, with_bias = weight_align(head, 1, align_bias=True)
    assert torch.allclose(with_bias.bias, torch.tensor([1.0, 2 / 3, 1.0]))


def test_align_errors() -> None:
    with pytest.raises(WeightlabError, match=r"n_old must be between 1 and 2 .* got 3"):
        align_rows(torch.ones(3, 2), 3)
    with pytest.raises(WeightlabError, match=r"all zero"):
        align_rows(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1)
    with pytest.raises(WeightlabError, match=r"\(classes, features\)"):
        align_rows(torch.ones(3), 1)


def test_herding_known_answer_and_normalisation() -> None:
    phi = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])  # μ = (0.65, 0.45)
    # k=1: ‖μ−φ‖ = .570, .354, .851, .570 → 1; k=2: (S+φ)/2 → 0 (.158; tie with 3, first wins);
    # k=3: [.533, .6] (.19) beats [.867, .267] (.284) → 2; then 3
    assert herding(phi, 4).tolist() == [1, 0, 2, 3]
    scaled = phi * torch.tensor([[2.0], [5.0], [0.5], [3.0]])  # herding sees L2-normalised features
    assert herding(scaled, 3).tolist() == [1, 0, 2]
    assert herding(phi, 10).tolist() == [1, 0, 2, 3]
    with pytest.raises(WeightlabError, match=r"\(N, D\) features"):
        herding(torch.ones(3), 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 5), m=st.integers(0, 14), seed=st.integers(0, 10_000))
def test_herding_properties(n: int, d: int, m: int, seed: int) -> None:
    feats = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).abs() + 0.01
    order = herding(feats, m)
    assert len(order) == min(m, n) and len(set(order.tolist())) == len(order)
    if m:
        phi = F.normalize(feats.double(), dim=1)
        dist = (phi.mean(0) - phi).norm(dim=1)
        assert dist[order[0]] == pytest.approx(dist.min().item())


def test_class_means_and_nme_known_answer() -> None:
    feats = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    means = class_means(feats, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(means, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    memory = ArrayDataset(feats, torch.tensor([0, 0, 1]))
    nme = NearestMeanClassifier.from_memory(Identity(), memory, 2)
    logits = nme(torch.tensor([[5.0, 1.0], [0.1, 4.0]]))
    assert logits.argmax(1).tolist() == [0, 1]
    assert logits[0, 0].item() == pytest.approx(
        -(F.normalize(torch.tensor([5.0, 1.0]), dim=0) - torch.tensor([1.0, 0.0])).pow(2).sum().item(),
        rel=1e-5,
    )


def test_replay_buffer_ordered_modes() -> None:
    x = torch.arange(12.0).reshape(12, 1)
    data = ArrayDataset(x, torch.tensor([0] * 6 + [1] * 6))

    def first(d: ArrayDataset, m: int) -> torch.Tensor:  # a selector that prefers the latest samples
        return torch.arange(len(d) - 1, -1, -1)[:m]

    buf = ReplayBuffer(8, selector=first)
    buf.update(data, generator=torch.Generator())
    assert buf.x.flatten().tolist() == [5, 4, 3, 2, 11, 10, 9, 8]
    buf.update(ArrayDataset(torch.tensor([[20.0], [21.0], [22.0]]), torch.tensor([2, 2, 2])), generator=None)
    # 3 classes share 8: each keeps its first 2 in priority order (iCaRL reduction)
    assert buf.x.flatten().tolist() == [5, 4, 11, 10, 22, 21]
    fixed = ReplayBuffer(0, per_class=3)
    fixed.update(data, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(fixed.y).tolist() == [3, 3]
    with pytest.raises(WeightlabError, match=r"per_class memory must be ≥ 1, got 0"):
        ReplayBuffer(5, per_class=0)


@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(1, 30), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       seed=st.integers(0, 999))
def test_ordered_memory_shrinks_by_truncation(capacity: int, sizes: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    buf = ReplayBuffer(capacity, selector=lambda d, m: torch.randperm(len(d), generator=gen)[:m])
    for step, n in enumerate(sizes):  # one new class per step, n samples of it
        before = {c: buf.x[buf.y == c].flatten().tolist() for c in range(step)} if len(buf) else {}
        buf.update(ArrayDataset(torch.rand(n, 1), torch.full((n,), step)), generator=gen)
        share = capacity // (step + 1)
        for c, old in before.items():
            kept = buf.x[buf.y == c].flatten().tolist()
            assert kept == old[: min(share, len(old))]  # a prefix, in priority order
        assert int((buf.y == step).sum()) == min(share, n)
        assert len(buf) <= capacity


# ---------------------------------------------------------------------------------------------- callbacks


def test_knowledge_distillation_loss_mix() -> None:
    teacher = Identity(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        teacher.head.weight.fill_(1.0)
    kd = KnowledgeDistillation(teacher, 1)
    batch = Batch(torch.tensor([[1.0, 2.0]]), torch.tensor([1]))
    logits = torch.tensor([[0.5, 1.5, -1.0, 0.0]])  # 4 classes: λ = 1/4
    out = kd.loss(None, batch, logits, torch.tensor(2.0))
    # with one old class the KD term is −1·log 1 = 0
    assert out.item() == pytest.approx(0.75 * 2.0)
    kd2 = KnowledgeDistillation(Identity(nn.Linear(2, 2, bias=False)), 2)
    with torch.no_grad():
        kd2.teacher.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # teacher logits [1, 0]
    expected = 0.5 * 2.0 + 0.5 * kd_loss(logits[:, :2], torch.tensor([[1.0, 0.0]])).item()
    assert kd2.loss(None, batch, logits, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(WeightlabError, match=r"n_old ≥ 1 old classes, got 0"):
        KnowledgeDistillation(teacher, 0)


def test_clip_and_expand_head() -> None:
    model = MLP(64, 10, hidden=(16,))
    with pytest.raises(WeightlabError, match=r"ExpandableHead, got Linear"):
        expand_head(model, 2)
    model.head = ExpandableHead(16)
    expand_head(model, 2)
    old = model.head.weight.detach().clone()
    expand_head(model, 3)
    assert model.head.num_classes == 5 and torch.equal(model.head.weight[:2], old)
    assert torch.equal(model.head.bias[2:], torch.zeros(3))
    data = ArrayDataset(torch.rand(64, 1, 8, 8), torch.arange(64) % 5)
    train(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.5), callbacks=[ClipHeadWeights(model.head)])
    assert model.head.weight.min().item() >= 0.0


def test_config_and_learner_errors() -> None:
    with pytest.raises(WeightlabError, match=r"selection must be 'herding' or 'random', got 'x'"):
        WAConfig(selection="x")
    with pytest.raises(WeightlabError, match=r"memory must be ≥ 0, got -1"):
        WAConfig(memory=-1)
    with pytest.raises(WeightlabError, match=r"needs model.head to be an ExpandableHead"):
        ClassIncrementalLearner(MLP(4, 2, hidden=(3,)))
    model = MLP(4, 2, hidden=(3,))
    model.head = ExpandableHead(3)
    learner = ClassIncrementalLearner(model, WAConfig(memory=4))
    with pytest.raises(WeightlabError, match=r"step labels must be the new classes 0..1, got 0..2"):
        learner.learn(ArrayDataset(torch.rand(3, 4), torch.tensor([0, 1, 2])), 2, TrainConfig())


def test_learner_state_round_trip(stream5) -> None:
    def fresh() -> ClassIncrementalLearner:
        torch.manual_seed(0)
        model = MLP(64, 10, hidden=(16,))
        model.head = ExpandableHead(16)
        return ClassIncrementalLearner(model, WAConfig(memory=20))

    lut = torch.full((10,), -1, dtype=torch.long)
    order = [c for e in stream5[:2] for c in e.classes]
    lut[order] = torch.arange(4)
    learner = fresh()
    for exp in stream5[:2]:
        d = ArrayDataset(exp.train.x, lut[exp.train.y])
        record = learner.learn(d, 2, TrainConfig(epochs=1, batch_size=32))
    assert record.n_old == 2 and record.n_total == 4 and 0 < record.gamma
    assert torch.bincount(learner.memory.y).tolist() == [5, 5, 5, 5]
    other = fresh()
    other.load_state_dict(learner.state_dict())
    assert other.num_classes == 4 and torch.equal(other.memory.x, learner.memory.x)
    x = stream5[0].test.x
    assert torch.equal(other.model(x), learner.model(x))


# ---------------------------------------------------------------------------------------------- experiment


def test_experiment_errors_and_cli_exit_status(tmp_path) -> None:
    with pytest.raises(WeightlabError, match=r"methods: 'foo' is not one of finetune, replay"):
        run_experiment("weight-aligning", profile="smoke", overrides={"methods": "foo"}, out=tmp_path / "a")
    with pytest.raises(WeightlabError, match=r"set data_root=PATH"):
        run_experiment("weight-aligning", profile="smoke", overrides={"data": "mnist"}, out=tmp_path / "b")
    assert (
        main(
            [
                "run",
                "weight-aligning",
                "--profile",
                "smoke",
                "--set",
                "methods=foo",
                "--quiet",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )


TINY = {
    "increments": "5",
    "epochs": "10",
    "methods": "finetune,kd-replay,wa-clip",
    "augment_to": "0",
    "memory": "40",
}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wa") / "whole"
    return out, run_experiment("weight-aligning", profile="smoke", overrides=TINY, out=out)[1]


def test_resume_mid_stream_gives_identical_results(tmp_path, monkeypatch, whole_run) -> None:
    whole_dir, whole = whole_run
    original = RunContext.save_state

    def interrupt_after_7(self: RunContext, *args, **kwargs) -> None:
        if self.saves == 7:  # finetune done, kd-replay 2 of 5 steps
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", interrupt_after_7)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("weight-aligning", profile="smoke", overrides=TINY, out=tmp_path / "cut")
    monkeypatch.setattr(RunContext, "save_state", original)
    _, resumed = run_experiment(
        "weight-aligning", profile="smoke", overrides=TINY, out=tmp_path / "cut", resume=True
    )
    a = json.loads((whole_dir / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a == b
    assert whole.tables == resumed.tables


def test_direction_norm_bias_and_aligning_reduces_forgetting(whole_run) -> None:
    out, res = whole_run
    held = {c.text: c for c in res.claims}
    bias = held["5 steps, wa-clip: new-class FC norms exceed the old before aligning, match after"]
    assert bias.direction and bias.measured["new/old norm before"] > 1.2  # one seed: the direction
    less = held["5 steps: aligning (wa-clip) forgets less than KD+replay without aligning"]
    assert less.direction
    after = res.records[0]["wa-clip/steps5"][-1]["norms_after"]
    assert sum(after[8:]) / 2 == pytest.approx(sum(after[:8]) / 8, rel=1e-4)
    assert (out / "plots" / "fc_norms_clip_5.png").is_file()
