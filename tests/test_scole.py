"""SCoLe: generator known answers and properties, strategies, resumable experiment, claim direction."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.cli import main
from weightlab.data import ArrayDataset
from weightlab.data.arrays import Batch
from weightlab.data.scenarios import SCoLeConfig, SCoLeStream, class_frequencies, class_probabilities, scole_tasks
from weightlab.errors import WeightlabError
from weightlab.experiments.base import run_experiment
from weightlab.methods.scole.strategies import FrequencyReplay, GroupMasking, TaskOptimizer
from weightlab.models import MLP
from weightlab.runs import RunContext
from weightlab.train import TrainConfig


def test_class_probabilities_known_answer() -> None:
    assert torch.allclose(class_probabilities(4), torch.full((4,), 0.25, dtype=torch.float64))
    raw = torch.tensor([0.25, 0.2375, 0.225, 0.2125], dtype=torch.float64)  # 1/N − (i/N)·0.05
    p1 = class_probabilities(4, entropy_decrease=1, seed=3)
    assert torch.allclose(p1.sort().values, (raw / raw.sum()).sort().values)
    p2 = class_probabilities(4, entropy_decrease=2, seed=3)
    assert torch.allclose(p2.sort().values, (raw**2 / (raw**2).sum()).sort().values)
    assert torch.equal(p1.argsort(), p2.argsort())  # the same seeded shuffle
    assert class_probabilities(100, entropy_decrease=1).min() > 0  # f = 0.01 for 100 classes


def test_generator_is_seeded_and_forgetting_variant_halves_classes() -> None:
    config = SCoLeConfig(n_tasks=40, seed=5)
    assert scole_tasks(config) == scole_tasks(config)
    assert scole_tasks(config) != scole_tasks(SCoLeConfig(n_tasks=40, seed=6))
    tasks = scole_tasks(SCoLeConfig(n_tasks=40, forgetting=True))
    assert all(max(t) < 5 for t in tasks[21:])  # task_id > T/2
    assert any(max(t) >= 5 for t in tasks[:21])
    freq = class_frequencies(scole_tasks(SCoLeConfig(n_tasks=2000)), 10)
    assert torch.allclose(freq, torch.full((10,), 0.2), atol=0.03)  # C/N under the uniform distribution
    freq_imb = class_frequencies(scole_tasks(SCoLeConfig(n_tasks=2000, entropy_decrease=5)), 10)
    p = class_probabilities(10, entropy_decrease=5)
    assert torch.equal(freq_imb.argmax(), p.argmax()) and torch.equal(freq_imb.argmin(), p.argmin())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 6),
    k=st.sampled_from([0.0, 1.0, 3.0]),
    seed=st.integers(0, 999),
    reduction=st.sampled_from([0.0, 2.0]),
)
def test_generator_properties(n: int, c: int, k: float, seed: int, reduction: float) -> None:
    c = min(c, n)
    tasks = scole_tasks(
        SCoLeConfig(
            num_classes=n,
            classes_per_task=c,
            n_tasks=15,
            entropy_decrease=k,
            prob_reduction=reduction,
            seed=seed,
        )
    )
    assert len(tasks) == 15
    for t in tasks:
        assert len(t) == c and len(set(t)) == c and list(t) == sorted(t) and 0 <= t[0] and t[-1] < n


def test_generator_errors() -> None:
    with pytest.raises(WeightlabError, match=r"classes_per_task must be in 1..10, got 11"):
        SCoLeConfig(classes_per_task=11)
    with pytest.raises(WeightlabError, match=r"classes_per_task ≤ 2"):
        SCoLeConfig(num_classes=4, classes_per_task=3, forgetting=True)
    with pytest.raises(WeightlabError, match=r"n_tasks must be ≥ 1, got 0"):
        SCoLeConfig(n_tasks=0)
    train = ArrayDataset(torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(WeightlabError, match=r"missing \[3, 4"):
        SCoLeStream(train, train, SCoLeConfig(num_classes=5))


def test_stream_experiences(digits8) -> None:
    stream = SCoLeStream(*digits8, SCoLeConfig(n_tasks=30, seed=1))
    assert len(stream) == 30 and len(stream.full_test) == len(digits8[1])
    for i in (0, 17, -1):
        exp = stream[i]
        assert set(exp.train.classes) == set(exp.classes) == set(exp.test.classes) == set(exp.val.classes)
        assert exp.classes == stream.tasks[i]
    assert 0.05 < len(stream[0].val) / (len(stream[0].train) + len(stream[0].val)) < 0.15
    with pytest.raises(IndexError, match=r"task 30 out of range"):
        stream[30]


def test_group_masking_known_answer() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
    batch = Batch(torch.zeros(2, 1), torch.tensor([1, 3]))
    masked = GroupMasking().transform_logits(None, batch, logits)
    assert torch.equal(masked[:, [1, 3]], logits[:, [1, 3]])
    assert (masked[:, [0, 2]] == -1e9).all()
    # the masked loss is the cross-entropy over the classes present in the batch
    ce = F.cross_entropy(masked, batch.y)
    assert ce.item() == pytest.approx(F.cross_entropy(logits[:, [1, 3]], torch.tensor([0, 1])).item())


def test_task_optimizer_reset_and_state() -> None:
    model = MLP(4, 3, hidden=(5,))
    config = TrainConfig(optimizer="adam", lr=1e-3)
    reset = TaskOptimizer(model, config, reset=True)
    assert reset.get() is not reset.get() and reset.state_dict() == {}
    keep = TaskOptimizer(model, config, reset=False)
    opt = keep.get()
    assert keep.get() is opt
    model(torch.rand(2, 4)).sum().backward()
    opt.step()
    state = keep.state_dict()
    assert any(k.endswith("exp_avg") for k in state)
    other = TaskOptimizer(model, config, reset=False)
    other.load_state_dict(state)
    p = next(model.parameters())
    assert torch.equal(other.get().state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_frequency_replay_selection_and_memory() -> None:
    mem = FrequencyReplay(6, (1,), per_class=4, replay_per_class=2, low=0.01, high=0.5, trigger=3)
    assert mem.classes_to_replay([0, 1]) == []
    data = ArrayDataset(torch.arange(12.0).reshape(12, 1), torch.tensor([0] * 6 + [1] * 6))
    gen = torch.Generator().manual_seed(0)
    mem.observe(data, (0, 1), (), generator=gen)
    assert mem.filled.tolist()[:2] == [4, 4] and mem.x.shape == (6, 4, 1)
    assert set(mem.x[0].flatten().tolist()) <= set(range(6))
    # hand-set statistics: 20 tasks; class 2 seen 2× (below trigger), 3: 4× (0.2), 4: 6× (0.3), 5: 12× (0.6)
    mem.tasks_seen.fill_(20)
    mem.occurrences.copy_(torch.tensor([15, 3, 2, 4, 6, 12]))
    assert mem.classes_to_replay([0, 1]) == [3, 4]  # rarest first, ≥ trigger, frequency in (0.01, 0.5]
    assert mem.classes_to_replay([3]) == [1]  # at most as many classes as the task has
    assert mem.classes_to_replay([1, 3, 4]) == []  # class 5 (0.6) is above the band: stop
    mem.filled[3] = 4
    replay = mem.replay_data([3], generator=gen)
    assert len(replay) == 2 and replay.y.tolist() == [3, 3]
    before = mem.x[1].clone()
    mem.observe(ArrayDataset(torch.full((6, 1), 99.0), torch.tensor([1] * 6)), (1,), (3,), generator=gen)
    renewed = int((mem.x[1] == 99.0).sum())
    assert renewed == max(4 // 4, 4 // 20) and mem.occurrences[1] == 4 and mem.occurrences[3] == 5
    assert int((mem.x[1] != before).sum()) == renewed


def test_experiment_errors_and_cli_exit_status(tmp_path) -> None:
    with pytest.raises(WeightlabError, match=r"checkpoint_every must be ≥ 1, got 0"):
        run_experiment("scole", profile="smoke", overrides={"checkpoint_every": "0"}, out=tmp_path / "z")
    with pytest.raises(WeightlabError, match=r"checkpoint interval must be ≥ 1 experience, got 0"):
        RunContext(tmp_path / "ctx").trial(0).stream("k", 3, lambda i, seed: [0.0], {}, every=0)
    with pytest.raises(WeightlabError, match=r"variants: 'x' is not one of sgd, sgd-mask"):
        run_experiment("scole", profile="smoke", overrides={"variants": "x"}, out=tmp_path / "a")
    assert (
        main(
            [
                "run",
                "scole",
                "--profile",
                "smoke",
                "--set",
                "classes_per_task=11",
                "--quiet",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )


RESUME = {"n_tasks": "12", "variants": "adam-mask-keep,imbalanced-mask-freq-replay", "entropy_decrease": "8",
          "checkpoint_every": "3"}


def test_resume_mid_stream_gives_identical_results(tmp_path, monkeypatch) -> None:
    run_experiment("scole", profile="smoke", overrides=RESUME, out=tmp_path / "whole")
    original = RunContext.save_state

    def interrupt(self: RunContext, *args, **kwargs) -> None:
        # 4 checkpoints per variant (tasks 2, 5, 8, 11): stop at the replay variant's task-8 checkpoint, so
        # the resumed run restarts from task 5 and repeats tasks 6-8
        if self.saves == 6:
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("scole", profile="smoke", overrides=RESUME, out=tmp_path / "cut")
    resumed_saves = []

    def count(self: RunContext, key: str, *args, **kwargs) -> None:
        resumed_saves.append(key)
        original(self, key, *args, **kwargs)

    monkeypatch.setattr(RunContext, "save_state", count)
    run_experiment("scole", profile="smoke", overrides=RESUME, out=tmp_path / "cut", resume=True)
    assert resumed_saves == [f"seed0/imbalanced-mask-freq-replay/exp{i}" for i in (8, 11)]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert a == b


def test_direction_knowledge_accumulation_and_masking(tmp_path) -> None:
    _, res = run_experiment(
        "scole",
        profile="smoke",
        out=tmp_path / "run",
        overrides={"n_tasks": "120", "variants": "sgd,sgd-mask", "augment_to": "2874"},
    )
    direction = {c.text.split(":")[0]: c.direction for c in res.claims}  # one seed: the direction of each claim
    assert direction["sgd-mask"] and direction["group masking ends higher than plain SGD"]
    assert (tmp_path / "run" / "plots" / "accuracy_along_stream.png").is_file()
