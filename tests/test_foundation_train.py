"""Models, heads, the training loop with its callbacks, evaluation and replay."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from weightlab.data import ArrayDataset, Batch
from weightlab.errors import WeightlabError
from weightlab.methods.continual.replay import Replay, ReplayBuffer
from weightlab.models import MLP, ExpandableHead, MultiHead, SmallCNN, TinyViT, resnet18_cifar, resnet32_cifar
from weightlab.train import Callback, TrainConfig, accuracy, per_class_accuracy, train
from weightlab.train.callbacks import HOOKS, overriding

# ------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("build, shape", [
    (lambda: MLP(64, 10, hidden=(16,)), (2, 1, 8, 8)),
    (lambda: SmallCNN(10, width=4), (2, 1, 16, 16)),
    (lambda: resnet32_cifar(7), (2, 3, 8, 8)),
    (lambda: resnet18_cifar(7, in_channels=1), (2, 1, 8, 8)),
    (lambda: TinyViT(10, image_size=16, dim=16, depth=1, num_heads=2), (2, 1, 16, 16)),
])
def test_models_give_logits_and_features(build, shape):
    model = build()
    x = torch.rand(shape)
    logits = model(x)
    assert logits.shape == (2, model.head.out_features)
    assert model.forward_features(x).shape == (2, model.num_features)


def test_vit_uses_timm_names():
    names = dict(TinyViT(10, dim=16, depth=1, num_heads=2).named_modules())
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "patch_embed.proj", "head"} <= set(names)


def test_expandable_head_keeps_old_rows():
    head = ExpandableHead(4, 2)
    old_w, old_b = head.weight.detach().clone(), head.bias.detach().clone()
    head.expand(3)
    assert head.num_classes == 5
    assert torch.equal(head.weight[:2], old_w) and torch.equal(head.bias[:2], old_b)
    assert head(torch.rand(6, 4)).shape == (6, 5)


def test_multihead_routes_by_task_id():
    heads = MultiHead(3, [2, 3])
    feats = torch.rand(4, 3)
    t = torch.tensor([0, 1, 1, 0])
    out = heads(feats, t)
    assert out.shape == (4, 3)
    assert torch.allclose(out[0, :2], heads.heads[0](feats[0]))
    assert torch.allclose(out[1], heads.heads[1](feats[1]))
    assert out[0, 2] == float("-inf")  # task 0 has two classes


def test_multihead_model_needs_task_id():
    model = MLP(64, 2)
    model.head = MultiHead(model.num_features, [2, 2])
    with pytest.raises(ValueError, match="task_id"):
        model(torch.rand(1, 1, 8, 8))
    assert model(torch.rand(1, 1, 8, 8), 1).shape == (1, 2)


# ------------------------------------------------------------------------------------------ loop


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_learns_digits(digits8):
    train_set, test_set = digits8
    model = MLP(64, 10, hidden=(64,))
    before = accuracy(model, test_set)
    state = train(model, train_set, TrainConfig(epochs=3, lr=0.05))
    assert accuracy(model, test_set) > max(0.85, before + 0.5)
    assert state.step == 3 * -(-len(train_set) // 64)
    assert state.epoch_losses[-1] < state.epoch_losses[0]


def test_same_seed_same_numbers(digits8):
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(123)
        model = MLP(64, 10, hidden=(16,))
        train(model, digits8[0], TrainConfig(epochs=1, seed=seed))
        results.append(_weights(model))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_max_steps_and_generic_dataset():
    data = TensorDataset(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    state = train(MLP(64, 10, hidden=(8,)), data, TrainConfig(epochs=5, batch_size=8, max_steps=7))
    assert state.step == 7


def test_hooks_run_in_order_and_only_when_overridden(digits8):
    calls = []

    class Recorder(Callback):
        def on_experience_start(self, state):
            calls.append("start")

        def on_batch(self, state, batch):
            calls.append("batch")
            return batch

        def transform_logits(self, state, batch, logits):
            calls.append("logits")
            return logits

        def sample_weights(self, state, batch, losses):
            calls.append("weights")
            return None

        def loss(self, state, batch, logits, loss):
            calls.append("loss")
            return loss

        def after_backward(self, state):
            calls.append("backward")

        def after_step(self, state):
            calls.append("step")

        def on_experience_end(self, state):
            calls.append("end")

    data = digits8[0].subset(range(16))
    train(MLP(64, 10, hidden=(8,)), data, TrainConfig(batch_size=8), callbacks=[Recorder(), Callback()])
    one = ["batch", "logits", "weights", "loss", "backward", "step"]
    assert calls == ["start", *one, *one, "end"]
    assert len(HOOKS) == 8 and overriding([Callback()], "loss") == []


def test_sample_weights_replace_the_mean():
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    a = MLP(64, 10, hidden=(8,))
    b = MLP(64, 10, hidden=(8,))
    b.load_state_dict(a.state_dict())

    class OnlyFirst(Callback):
        def sample_weights(self, state, batch, losses):
            return torch.tensor([1.0, 0.0, 0.0, 0.0])

    cfg = TrainConfig(batch_size=4, momentum=0.0, lr=0.1)
    train(a, ArrayDataset(x, y), cfg, callbacks=[OnlyFirst()])
    train(b, ArrayDataset(x[:1], y[:1]), cfg)
    assert torch.allclose(_weights(a), _weights(b), atol=1e-6)


def test_loss_hook_adds_a_term():
    class Penalty(Callback):
        def loss(self, state, batch, logits, loss):
            return loss + 1000.0 * sum(p.pow(2).sum() for p in state.model.parameters())

    model = MLP(64, 10, hidden=(8,))
    norm = _weights(model).norm()
    train(model, ArrayDataset(torch.rand(8, 1, 8, 8), torch.zeros(8)), TrainConfig(lr=1e-4, momentum=0.0),
          callbacks=[Penalty()])
    assert _weights(model).norm() < norm * 0.9


def test_bad_configs_and_data():
    with pytest.raises(WeightlabError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(WeightlabError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(WeightlabError, match="empty"):
        train(MLP(64, 2), ArrayDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)))
    frozen = MLP(64, 2).requires_grad_(False)
    with pytest.raises(WeightlabError, match="no trainable parameters"):
        train(frozen, ArrayDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2)))


def test_per_class_accuracy_known_answer():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    acc = per_class_accuracy(logits, torch.tensor([0, 0, 1]), 3)
    assert acc[0] == 0.5 and acc[1] == 0.0 and torch.isnan(acc[2])


# ------------------------------------------------------------------------------------------ replay


def test_replay_buffer_is_class_balanced(digits8):
    buffer = ReplayBuffer(20)
    gen = torch.Generator().manual_seed(0)
    train_set = digits8[0]
    buffer.update(train_set.subset(torch.nonzero(train_set.y < 2).flatten()), generator=gen)
    assert len(buffer) == 20 and torch.bincount(buffer.y).tolist() == [10, 10]
    buffer.update(train_set.subset(torch.nonzero((train_set.y >= 2) & (train_set.y < 4)).flatten()), generator=gen)
    assert torch.bincount(buffer.y).tolist() == [5, 5, 5, 5]
    restored = ReplayBuffer(20)
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.x, buffer.x)


def test_replay_callback_appends_memory(digits8):
    buffer = ReplayBuffer(10)
    buffer.update(digits8[0].subset(range(50)), generator=torch.Generator().manual_seed(0))
    seen = []

    class Spy(Callback):
        def loss(self, state, batch, logits, loss):
            seen.append(len(batch))
            return loss

    new = digits8[0].subset(range(100, 108))
    train(MLP(64, 10, hidden=(8,)), new, TrainConfig(batch_size=8),
          callbacks=[Replay(buffer), Spy()], experience=SimpleNamespace(train=new))
    assert seen == [16]
    assert set(buffer.y.tolist()) == set(digits8[0].y[:50].tolist()) | set(new.y.tolist())
    assert isinstance(buffer.sample(3, generator=torch.Generator()), Batch)


def test_replay_share_counts_every_class_ever_seen():
    buffer = ReplayBuffer(2)
    gen = torch.Generator().manual_seed(0)
    for c in range(3):  # capacity 2, three classes: the share drops to 0 and stays there
        buffer.update(ArrayDataset(torch.rand(4, 1), torch.full((4,), c)), generator=gen)
    assert len(buffer) == 0 and buffer.seen.tolist() == [0, 1, 2]
    restored = ReplayBuffer(2)
    restored.load_state_dict(buffer.state_dict())
    assert restored.seen.tolist() == [0, 1, 2]


def test_after_step_sees_this_steps_loss():
    seen = []

    class Spy(Callback):
        def loss(self, state, batch, logits, loss):
            seen.append(("loss", loss.detach().clone()))
            return loss

        def after_step(self, state):
            seen.append(("step", state.loss))

    train(MLP(64, 10, hidden=(8,)), ArrayDataset(torch.rand(16, 1, 8, 8), torch.zeros(16)),
          TrainConfig(batch_size=8), callbacks=[Spy()])
    assert [k for k, _ in seen] == ["loss", "step", "loss", "step"]
    assert torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[2][1], seen[3][1])
