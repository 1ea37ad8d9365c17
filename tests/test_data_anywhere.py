"""Any PyTorch dataset: train, predict/accuracy, the attacks and MRC take an ArrayDataset, a TensorDataset,
any map-style Dataset or a DataLoader, with the same batches (and results) for the same seed."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from weightlab.data.arrays import ArrayDataset, Batch, as_array_dataset, iter_batches, num_batches, to_batch
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD, adversarial_dataset, adversarial_predict
from weightlab.methods.rift.rift import finetune, module_robust_criticality
from weightlab.models import MLP
from weightlab.train import TrainConfig, accuracy, predict, train


class Samples(Dataset):
    """A plain map-style dataset: ``(image tensor, int label)`` per index, as torchvision datasets give."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], int(self.y[i])


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


def tensors(n: int = 40) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def model() -> MLP:
    torch.manual_seed(0)
    return MLP(64, 10, hidden=(8,))


FORMS = {
    "array": lambda x, y: ArrayDataset(x, y),
    "tensor": lambda x, y: TensorDataset(x, y),
    "subset": lambda x, y: Subset(TensorDataset(x, y), list(range(len(y)))),
    "map-style": lambda x, y: Samples(x, y),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_train_gives_the_same_weights_on_every_dataset_form(form: str) -> None:
    x, y = tensors()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=5)
    ref, other = model(), model()
    train(ref, ArrayDataset(x, y), cfg)
    train(other, FORMS[form](x, y), cfg)
    for a, b in zip(ref.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_runs_on_a_dataloader_with_its_own_batches() -> None:
    x, y = tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    state = train(net, loader, TrainConfig(epochs=2, batch_size=4))
    assert state.step == 2 * len(loader) == 6  # the loader's batch size (16), not the config's (4)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("form", [*FORMS, "loader"])
def test_predict_and_accuracy_agree_on_every_form(form: str) -> None:
    x, y = tensors()
    data = DataLoader(TensorDataset(x, y), batch_size=7) if form == "loader" else FORMS[form](x, y)
    net = model()
    logits, targets = predict(net, ArrayDataset(x, y))
    got_logits, got_targets = predict(net, data, batch_size=9)
    assert torch.allclose(got_logits, logits, atol=1e-6) and torch.equal(got_targets, targets)
    assert accuracy(net, data) == pytest.approx(accuracy(net, ArrayDataset(x, y)))


@pytest.mark.parametrize("form", ["tensor", "map-style", "loader"])
def test_attacks_and_mrc_accept_any_dataset(form: str) -> None:
    x, y = tensors(24)
    data = DataLoader(TensorDataset(x, y), batch_size=256) if form == "loader" else FORMS[form](x, y)
    net, attack = model(), PGD(eps=0.1, steps=2)
    ref = adversarial_dataset(net, ArrayDataset(x, y), attack, seed=1)
    adv = adversarial_dataset(net, data, attack, seed=1)
    assert torch.equal(adv.x, ref.x) and torch.equal(adv.y, ref.y)
    logits, targets = adversarial_predict(net, data, attack, seed=1)
    assert torch.equal(targets, y) and logits.shape == (24, 10)
    as_loader = DataLoader(TensorDataset(ref.x, ref.y), batch_size=8)
    assert module_robust_criticality(net, as_loader, epochs=1) == module_robust_criticality(net, ref, epochs=1)


def test_rift_finetune_takes_a_dataloader() -> None:
    x, y = tensors()
    net = model()
    tuned = finetune(net, DataLoader(TensorDataset(x, y), batch_size=8), "head", TrainConfig(epochs=1))
    assert not torch.equal(tuned.head.weight, net.head.weight)
    assert torch.equal(tuned.body[1].weight, net.body[1].weight)  # frozen


def test_tensor_dataset_is_viewed_without_a_copy() -> None:
    x, y = tensors()
    view = as_array_dataset(TensorDataset(x, y))
    assert view.x is x and torch.equal(view.y, y)
    loaded = as_array_dataset(DataLoader(Samples(x, y), batch_size=16))
    assert torch.equal(loaded.x, x) and torch.equal(loaded.y, y)
    assert num_batches(Samples(x, y), 16) == 3 and num_batches(DataLoader(Samples(x, y), batch_size=16), 4) == 3


def test_batches_carry_task_ids_from_any_form() -> None:
    x, y = tensors(6)
    t = torch.tensor([0, 0, 1, 1, 2, 2])
    batches = list(iter_batches(DataLoader(TensorDataset(x, y, t), batch_size=4), 99))
    assert torch.equal(torch.cat([b.t for b in batches]), t)  # type: ignore[misc]
    assert to_batch({"x": x, "y": y}).t is None


@pytest.mark.parametrize("bad, match", [
    (Stream(), "IterableDataset; wrap it in a DataLoader"),
    ([1, 2, 3], "expected a torch Dataset or DataLoader, got list"),
])
def test_unusable_data_is_refused(bad: object, match: str) -> None:
    with pytest.raises(WeightlabError, match=match):
        train(nn.Linear(2, 2), bad, TrainConfig())  # type: ignore[arg-type]


def test_batches_of_the_wrong_shape_are_refused() -> None:
    with pytest.raises(WeightlabError, match="expected batches of .* got a tuple of 1"):
        to_batch((torch.zeros(2),))
    with pytest.raises(WeightlabError, match="got a str"):
        to_batch("x")
    assert isinstance(to_batch([torch.zeros(2, 3), torch.tensor([1, 0])]), Batch)
