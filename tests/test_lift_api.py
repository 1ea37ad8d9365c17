"""LIFT's API (methods/lift/model.py): prepare, weightlab and plain loops, extract_delta, merge_and_unload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.lift.model import LiftConfig, extract_delta, find_targets, merge_and_unload, prepare
from weightlab.train import TrainConfig, train
from weightlab.weights.io import load_tensors, save_tensors


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data(n: int = 96) -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return ArrayDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def test_prepare_targets_every_linear_but_the_head_and_freezes_the_rest() -> None:
    model = Net()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1))
    assert list(lift.targets) == ["body.0", "body.2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["body.0.weight", "body.2.weight"]
    assert lift.trainable_entries() == (16 + 8) + (16 + 16)
    only = find_targets(Net(), LiftConfig(rank=2, target_modules=("body.2",)))
    assert list(only) == ["body.2"]


def test_weightlab_loop_changes_only_masked_entries_and_delta_matches() -> None:
    model = Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, refresh_every=2, lr=1e-2, weight_decay=0.1))
    state = train(model, data(), TrainConfig(epochs=2, batch_size=32), optimizer=lift.optimizer)
    assert state.step == 6
    delta = extract_delta(model)
    assert sorted(delta) == ["body.0.weight", "body.2.weight"]
    for name, value in model.state_dict().items():
        if name in delta:
            assert torch.allclose(start[name] + delta[name], value)
            changed = (value != start[name]).sum().item()
            k = lift.config.budget(tuple(value.shape))
            # refreshed twice: at most three masks' worth of entries moved, at least one mask's worth
            assert k <= changed <= 3 * k
        else:
            assert torch.equal(value, start[name]), name


def test_sparse_delta_round_trips_through_safetensors(tmp_path) -> None:
    model = Net()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, lr=1e-2))
    train(model, data(), TrainConfig(epochs=1, batch_size=32), optimizer=lift.optimizer)
    sparse = extract_delta(lift, dense=False)
    save_tensors(sparse, tmp_path / "delta.safetensors")
    back = load_tensors(tmp_path / "delta.safetensors")
    dense = extract_delta(model)
    for name, d in dense.items():
        rebuilt = torch.zeros_like(d)
        rebuilt.view(-1)[back[f"{name}.indices"]] = back[f"{name}.values"]
        assert torch.equal(rebuilt, d)
        assert back[f"{name}.indices"].numel() == lift.config.budget(tuple(d.shape))


def test_plain_pytorch_loop_reduces_the_loss_and_unload_restores_the_model() -> None:
    torch.manual_seed(0)
    model = Net()
    lift = prepare(model, LiftConfig(rank=4, lora_rank=2, lr=2e-2, modules_to_save=("head",)))
    ds = data()
    losses = []
    for _ in range(30):
        lift.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(ds.x), ds.y)
        loss.backward()
        lift.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert model.head.weight.requires_grad
    plain = merge_and_unload(model)
    assert all(p.requires_grad for p in plain.parameters())
    nn.functional.cross_entropy(plain(ds.x), ds.y).backward()
    assert plain.body[0].weight.grad is not None  # hooks removed: dense gradients stay
    with pytest.raises(WeightlabError, match="not prepared for LIFT"):
        extract_delta(plain)


def test_gradient_and_baseline_masks_run() -> None:
    for mask in ("gradient", "magnitude", "random"):
        model = Net()
        start = model.body[0].weight.detach().clone()
        lift = prepare(model, LiftConfig(rank=2, lora_rank=1, mask=mask, lr=1e-2, refresh_every=2))
        train(model, data(), TrainConfig(epochs=1, batch_size=32), optimizer=lift.optimizer)
        assert (model.body[0].weight != start).any(), mask


def test_bad_input_is_named() -> None:
    with pytest.raises(WeightlabError, match="the model's linear layers are: body.0, body.2, head"):
        prepare(Net(), LiftConfig(rank=2, target_modules=("q_proj",)))
    with pytest.raises(WeightlabError, match="rank 9 exceeds min\\(m, n\\) = 8 of 'body.0'"):
        prepare(Net(), LiftConfig(rank=9))
    model = Net()
    fp8 = model.body[2].weight.detach().to(torch.float8_e4m3fn)
    model.body[2].weight = nn.Parameter(fp8, requires_grad=False)
    with pytest.raises(WeightlabError, match="'body.2' has weights of dtype torch.float8_e4m3fn"):
        prepare(model, LiftConfig(rank=2))
    with pytest.raises(WeightlabError, match="give lora_rank \\(4\\) or density \\(0.05\\), not both"):
        LiftConfig(lora_rank=4, density=0.05)
    with pytest.raises(WeightlabError, match="mask must be one of"):
        LiftConfig(mask="smallest")  # type: ignore[arg-type]
    with pytest.raises(WeightlabError, match="modules_to_save \\['classifier'\\] match no module"):
        prepare(Net(), LiftConfig(rank=2, modules_to_save=("classifier",)))
    model = Net()
    prepare(model, LiftConfig(rank=2))
    with pytest.raises(WeightlabError, match="already prepared"):
        prepare(model, LiftConfig(rank=2))


def test_sparse_grad_trains_exactly_like_the_dense_gradient_path_without_forming_it() -> None:
    ds = data()
    models = []
    for sparse_grad in (False, True):
        torch.manual_seed(0)
        model = Net()
        cfg = LiftConfig(rank=2, lora_rank=1, lr=1e-2, refresh_every=3, sparse_grad=sparse_grad)
        lift = prepare(model, cfg)
        for _ in range(7):
            lift.optimizer.zero_grad()
            nn.functional.cross_entropy(model(ds.x), ds.y).backward()
            assert model.body[0].weight.grad is None
            lift.optimizer.step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    plain = merge_and_unload(models[1])
    nn.functional.cross_entropy(plain(ds.x), ds.y).backward()
    assert plain.body[0].weight.grad is not None  # the patched forward is gone
    with pytest.raises(WeightlabError, match="sparse_grad=True never forms the dense gradient"):
        LiftConfig(sparse_grad=True, mask="gradient")
