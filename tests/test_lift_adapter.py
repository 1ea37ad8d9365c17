"""LIFT for PEFT users: save_pretrained / from_pretrained adapter folders (bit-exact round trip, validated
reading), true trainable counts, loud failure when the optimizer is never stepped, clipping of the gathered
gradients."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.lift import LiftConfig, from_pretrained, lift_config, prepare
from weightlab.methods.lift import optimizer as lift_optimizer
from weightlab.methods.lift.adapter import CONFIG_FILE, WEIGHTS_FILE, delta_dtype, sparse_delta
from weightlab.train import TrainConfig, train
from weightlab.weights.io import load_tensors, save_tensors


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.to(self.head.weight.dtype))).float()


def data(n: int = 96) -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return ArrayDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def tuned(dtype: torch.dtype = torch.float32, **config: object):
    model = Net(dtype)
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, refresh_every=2, lr=3e-2, **config))  # type: ignore[arg-type]
    train(model, data(), TrainConfig(epochs=2, batch_size=32, amp=False), optimizer=lift.optimizer)
    return model, lift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_save_and_load_round_trip_is_bit_exact(tmp_path, dtype: torch.dtype) -> None:
    model, lift = tuned(dtype, modules_to_save=("head",))
    folder = lift.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    fresh = Net(dtype)
    assert not torch.equal(fresh.body[0].weight, model.body[0].weight)
    assert from_pretrained(fresh, folder) is fresh
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name  # bit for bit
    assert lift_config(folder) == lift.config
    tensors = load_tensors(folder / WEIGHTS_FILE)
    assert tensors["body.0.weight.values"].dtype == delta_dtype(dtype)
    assert tensors["body.0.weight.indices"].numel() <= 3 * lift.config.budget((16, 8))


def test_entries_that_would_not_round_back_are_stored_exactly() -> None:
    # 1.0 → 1e-20: in float64, 1e-20 − 1 rounds to −1 and 1 + (−1) = 0, not 1e-20
    weight = torch.tensor([[1.0, 0.5, 2.0]])
    base = torch.tensor([1.0, 0.5, 2.0])
    weight[0, 0], weight[0, 2] = 1e-20, 2.25
    saved = sparse_delta(weight, torch.tensor([0, 2]), base[[0, 2]])
    assert saved["exact_indices"].tolist() == [0] and torch.equal(saved["exact_values"], weight[0, :1])
    assert saved["values"].dtype == torch.float64 and saved["values"][1].item() == 0.25


def test_the_handle_names_the_peft_fields(tmp_path) -> None:
    _, lift = tuned(modules_to_save=("head",))
    config = json.loads((lift.save_pretrained(tmp_path) / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LIFT" and config["modules_to_save"] == {
        "head.weight": {"shape": [3, 16], "dtype": "float32"}, "head.bias": {"shape": [3], "dtype": "float32"}}
    assert config["targets"]["body.2.weight"] == {"shape": [16, 16], "dtype": "float32"}


def corrupt(folder, key: str, value: torch.Tensor) -> None:
    tensors = load_tensors(folder / WEIGHTS_FILE)
    tensors[key] = value
    save_tensors(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize("change, match", [
    (lambda f: corrupt(f, "body.0.weight.indices", torch.tensor([0, 200])),
     r"indices in \[0, 200\], outside \[0, 128\)"),
    (lambda f: corrupt(f, "body.0.weight.indices", torch.tensor([3, 1])), "strictly increasing"),
    (lambda f: corrupt(f, "body.0.weight.indices", torch.tensor([1.0, 2.0])), "must be a 1-D int32/int64 tensor"),
    (lambda f: corrupt(f, "body.0.weight.values", torch.zeros(2, dtype=torch.float16)),
     "values must be torch.float64 of shape"),
    (lambda f: corrupt(f, "body.0.weight.values", torch.full((2,), float("nan"), dtype=torch.float64)),
     "non-finite"),
    (lambda f: corrupt(f, "extra", torch.zeros(1)), "unexpected tensor 'extra'"),
    (lambda f: (f / CONFIG_FILE).write_text('{"peft_type": "LORA"}'), "a LORA adapter, not a LIFT one"),
    (lambda f: (f / CONFIG_FILE).write_text("{"), "is not valid JSON"),
    (lambda f: (f / WEIGHTS_FILE).unlink(), "no LIFT adapter at"),
])
def test_reading_a_bad_adapter_fails_with_one_line(tmp_path, change, match: str) -> None:
    model, lift = tuned()
    folder = lift.save_pretrained(tmp_path / "a")
    corrupt(folder, "body.0.weight.values", torch.zeros(2, dtype=torch.float64))  # a valid 2-entry delta
    corrupt(folder, "body.0.weight.indices", torch.tensor([0, 5]))
    change(folder)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(WeightlabError, match=match) as info:
        from_pretrained(fresh, folder)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing half-applied


def test_loading_onto_another_architecture_names_the_mismatch(tmp_path) -> None:
    _, lift = tuned()
    folder = lift.save_pretrained(tmp_path)
    with pytest.raises(WeightlabError, match=r"expects 'body.0.weight' of shape \(16, 8\) and dtype float32, the "
                                             r"model's is \(16, 8\) bfloat16"):
        from_pretrained(Net(torch.bfloat16), folder)
    other = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(WeightlabError, match="changes 'body.0.weight', which Sequential does not have"):
        from_pretrained(other, folder)


def test_trainable_counts_are_the_lift_entries(capsys) -> None:
    model = Net()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1, modules_to_save=("head",)))
    total = sum(p.numel() for p in model.parameters())
    expected = (16 + 8) + (16 + 16) + 3 * 16 + 3
    assert lift.get_nb_trainable_parameters() == (expected, total)
    lift.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {expected:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * expected / total:.4f}\n")


def test_an_optimizer_that_never_stepped_fails_loudly(tmp_path, monkeypatch) -> None:
    model = Net()
    lift = prepare(model, LiftConfig(rank=2, lora_rank=1))
    other = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # what Trainer builds alone
    monkeypatch.setattr(lift_optimizer, "UNSTEPPED_WARNING", 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            nn.functional.cross_entropy(model(data().x), data().y).backward()
            other.step()
    assert any("gathered 3 gradients of a weight without a step" in str(w.message) for w in caught)
    for call in (lambda: lift.save_pretrained(tmp_path), lift.extract_delta, lift.merge_and_unload):
        with pytest.raises(WeightlabError, match="gradients of 3 backward passes but was never stepped"):
            call()
    lift.optimizer.step()
    assert lift.optimizer.unstepped_backward_passes == 0 and lift.merge_and_unload() is model


def test_clipping_applies_to_the_gathered_gradients() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    head = nn.Parameter(torch.zeros(2))
    keep = lambda weight, grad: torch.tensor([0, 3])  # noqa: E731
    opt = lift_optimizer.SparseAdamW([{"params": [w], "sparse": True, "selectors": [keep]}, {"params": [head]}])
    (w * torch.tensor([[3.0, 100.0], [100.0, 0.0]])).sum().backward()  # gathered: (3, 0); the rest is masked
    (head * torch.tensor([0.0, 4.0])).sum().backward()
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == pytest.approx(5.0)  # ‖(3, 0, 0, 4)‖, not the dense 100s
    assert opt._grads[w].tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert head.grad.tolist() == pytest.approx([0.0, 0.8], rel=1e-5)


def test_the_loop_clips_lift_gradients() -> None:
    def moved(clip: float | None) -> float:
        model = Net()
        start = model.body[0].weight.detach().clone()
        lift = prepare(model, LiftConfig(rank=2, lora_rank=1, lr=1e-2, eps=1e-8))
        train(model, data(), TrainConfig(max_steps=3, batch_size=32, grad_clip=clip), optimizer=lift.optimizer)
        return float((model.body[0].weight.detach() - start).abs().sum())

    assert moved(1e-9) < 0.05 * moved(None)
