"""Hypernetworks: generated shapes, the output regulariser, chunk dependencies of the RNN version, growth."""

from __future__ import annotations

import pytest
import torch

from weightlab.data import ArrayDataset, Experience
from weightlab.errors import WeightlabError
from weightlab.methods.hypernet.hypernetworks import (
    ChunkedMLPHyperNet,
    HnetRegConfig,
    HyperModel,
    LSTMHyperNet,
    MLPHyperNet,
    OutputRegularizer,
    count_parameters,
    output_regularizer,
    param_shapes,
    unflatten,
    weight_importance,
)
from weightlab.models import MLP
from weightlab.train import TrainConfig, train


def _target() -> MLP:
    return MLP(16, 3, hidden=(8,))  # 16·8 + 8 + 8·3 + 3 = 163 weights


def _hnets(n: int) -> list:
    return [MLPHyperNet(n, hidden=(5,)), ChunkedMLPHyperNet(n, chunk_size=40, hidden=(5,)),
            LSTMHyperNet(n, chunk_size=40, hidden=6)]


@pytest.mark.parametrize("kind", range(3))
def test_generated_weights_have_the_target_shapes(kind: int) -> None:
    target = _target()
    n = sum(p.numel() for p in target.parameters())
    hnet = _hnets(n)[kind]
    model = HyperModel(target, hnet)
    hnet.add_task()
    hnet.add_task()
    weights = model.target_weights(1)
    assert {k: v.shape for k, v in weights.items()} == param_shapes(target)
    assert hnet([0, 1]).shape == (2, n)
    # the output is the target run with those weights
    x = torch.rand(4, 1, 4, 4)
    target.load_state_dict({k: v.detach() for k, v in weights.items()})
    torch.testing.assert_close(model(x, 1), target(x))
    # only the hypernetwork is trainable, and gradients reach it
    assert count_parameters(model) == count_parameters(hnet)
    model(x, 1).sum().backward()
    assert hnet.embeddings[1].grad is not None and hnet.embeddings[0].grad is None


def test_mixed_task_ids_route_each_sample() -> None:
    target = _target()
    hnet = ChunkedMLPHyperNet(163, chunk_size=50)
    model = HyperModel(target, hnet)
    hnet.add_task()
    hnet.add_task()
    x, t = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    out = model(x, t)
    torch.testing.assert_close(out[t == 0], model(x[t == 0], 0))
    torch.testing.assert_close(out[t == 1], model(x[t == 1], 1))


def test_changing_one_chunk_input_affects_later_chunks_only_in_the_rnn() -> None:
    torch.manual_seed(0)
    for hnet, rnn in ((LSTMHyperNet(200, chunk_size=20, hidden=6), True),
                      (ChunkedMLPHyperNet(200, chunk_size=20, hidden=(6,)), False)):
        hnet.add_task()
        inputs = hnet.chunk_inputs(torch.stack([hnet.embeddings[0]])).detach()  # (1, K, E + C)
        k = 4
        changed = inputs.clone()
        changed[:, k] += 1.0
        a, b = hnet.chunks_from_inputs(inputs), hnet.chunks_from_inputs(changed)  # (1, K, chunk)
        diff = (a - b).abs().amax(dim=2)[0]  # (K,)
        assert torch.all(diff[:k] == 0)  # earlier chunks never change
        assert diff[k] > 0
        if rnn:
            assert torch.all(diff[k + 1:] > 0)  # the RNN carries the change forward
        else:
            assert torch.all(diff[k + 1:] == 0)  # chunks of the MLP hypernet are independent


def test_growth_keeps_every_generated_weight() -> None:
    torch.manual_seed(0)
    hnet = LSTMHyperNet(150, chunk_size=30, hidden=5)
    hnet.add_task()
    hnet.add_task()
    before = hnet([0, 1]).detach()
    n_before = count_parameters(hnet)
    hnet.grow(3)
    assert hnet.lstm.hidden_size == 8 and count_parameters(hnet) > n_before
    torch.testing.assert_close(hnet([0, 1]).detach(), before)


def test_output_regularizer_known_answer_and_zero_when_unchanged() -> None:
    torch.manual_seed(0)
    hnet = MLPHyperNet(4, hidden=(3,))
    hnet.add_task()
    hnet.add_task()
    out = hnet([0, 1]).detach()
    assert output_regularizer(hnet, out, [0, 1]).item() == 0.0
    shifted = out + torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    assert output_regularizer(hnet, shifted, [0, 1]).item() == pytest.approx((1.0 + 4.0) / 2)
    imp = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0]])
    assert output_regularizer(hnet, shifted, [0, 1], importance=imp).item() == pytest.approx((3.0 + 2.0) / 2)
    with pytest.raises(WeightlabError, match="targets must have shape \\(2, 4\\)"):
        output_regularizer(hnet, out[:1], [0, 1])


class _State:
    def __init__(self, task: int, data: ArrayDataset) -> None:
        self.experience = Experience(data, data, data, (0, 1, 2), task)
        self.generator = torch.Generator().manual_seed(0)


def test_regularizer_callback_is_zero_when_nothing_changed_and_grows_after_a_change() -> None:
    torch.manual_seed(0)
    model = HyperModel(_target(), LSTMHyperNet(163, chunk_size=40, hidden=6))
    for _ in range(3):
        model.hnet.add_task()
    data = ArrayDataset(torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,)))
    for config in (HnetRegConfig(beta=0.5), HnetRegConfig(beta=0.5, n_sampled=1, importance=True)):
        reg = OutputRegularizer(model, config)
        if config.importance:
            reg.importance = [weight_importance(model, data.batch(slice(0, 6)), j) for j in range(2)]
            assert reg.importance[0].mean().item() == pytest.approx(1.0)
        reg.on_experience_start(_State(2, data))
        assert reg.targets.shape == (2, 163)
        base = torch.tensor(0.7)
        assert reg.loss(_State(2, data), None, None, base).item() == pytest.approx(0.7)
        with torch.no_grad():
            model.hnet.readout.bias.add_(0.1)
        assert reg.loss(_State(2, data), None, None, base).item() > 0.7
        with torch.no_grad():
            model.hnet.readout.bias.sub_(0.1)


def test_output_regularizer_reduces_forgetting_end_to_end() -> None:
    """Direction of von Oswald's claim at tiny scale: with β > 0 task 0's generated weights (and accuracy)
    survive training task 1; with β = 0 they drift."""
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 1, 4, 4, generator=gen), torch.randn(64, 1, 4, 4, generator=gen)
    w0, w1 = torch.randn(16, 3, generator=gen), torch.randn(16, 3, generator=gen)
    tasks = [ArrayDataset(x, (x.flatten(1) @ w).argmax(1), torch.full((64,), t))
             for t, (x, w) in enumerate(((x0, w0), (x1, w1)))]
    drift = {}
    for beta in (0.0, 1.0):
        torch.manual_seed(1)
        model = HyperModel(_target(), LSTMHyperNet(163, chunk_size=40, hidden=8))
        model.hnet.add_task()
        model.hnet.add_task()
        reg = OutputRegularizer(model, HnetRegConfig(beta=beta))
        for t, data in enumerate(tasks):
            exp = Experience(data, data, data, (0, 1, 2), t)
            train(model, data, TrainConfig(max_steps=30, batch_size=16, lr=0.01, optimizer="adam", seed=t),
                  callbacks=[reg], experience=exp)
            if t == 0:
                after_task0 = model.hnet(0).detach()
        drift[beta] = (model.hnet(0).detach() - after_task0).norm().item()
    assert drift[1.0] < 0.5 * drift[0.0]


def test_hypernet_errors_name_the_bad_value() -> None:
    with pytest.raises(WeightlabError, match="expected a flat vector of 163 weights, got shape \\(10,\\)"):
        unflatten(torch.zeros(10), param_shapes(_target()))
    with pytest.raises(WeightlabError, match="generates 100 weights but the target has 163"):
        HyperModel(_target(), MLPHyperNet(100))
    hnet = MLPHyperNet(163)
    with pytest.raises(WeightlabError, match="task id 0 has no embedding .* knows 0 tasks"):
        hnet(0)
    with pytest.raises(WeightlabError, match="chunk_size must be ≥ 1, got 0"):
        ChunkedMLPHyperNet(163, chunk_size=0)
    with pytest.raises(WeightlabError, match="grow\\(\\) needs extra ≥ 1"):
        LSTMHyperNet(163, chunk_size=40).grow(0)
    with pytest.raises(WeightlabError, match="beta must be ≥ 0, got -1"):
        HnetRegConfig(beta=-1.0)
    with pytest.raises(WeightlabError, match="n_sampled must be ≥ 1 or None, got 0"):
        HnetRegConfig(n_sampled=0)

