"""TRADES and MART, the adversarial-training bases of RiFT's Table 2: losses, the inner attack, the callbacks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weightlab.data import Batch
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial import (
    MART,
    PGD,
    TRADES,
    MARTConfig,
    TRADESConfig,
    adversarial_predict,
    kl_per_sample,
    margin_term,
    mart_loss,
    trades_attack,
    trades_loss,
)
from weightlab.models import MLP, SmallCNN
from weightlab.train import TrainConfig, train
from weightlab.train.loop import LoopState


def _log(*p: float) -> torch.Tensor:
    return torch.log(torch.tensor([p]))


def test_kl_and_trades_loss_known_answer() -> None:
    clean = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # p = (½, ½) for both samples
    adv = torch.cat([_log(0.75, 0.25), torch.zeros(1, 2)])  # q = (¾, ¼), then q = p
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = ½ log(4/3)
    assert torch.allclose(kl_per_sample(clean, adv), torch.tensor([kl, 0.0]), atol=1e-6)
    y = torch.tensor([0, 1])
    assert trades_loss(clean, adv, y, beta=6.0).item() == pytest.approx(math.log(2) + 6 * kl / 2, rel=1e-6)
    assert trades_loss(clean, adv, y, beta=0.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_mart_loss_known_answer() -> None:
    adv = torch.cat([_log(0.5, 0.3, 0.2), _log(0.5, 0.3, 0.2)])
    clean = torch.cat([_log(0.8, 0.1, 0.1), _log(0.8, 0.1, 0.1)])
    y = torch.tensor([0, 1])  # sample 1: right on x' (max other 0.3); sample 2: wrong (max other 0.5)
    assert torch.allclose(margin_term(adv, y), torch.tensor([-math.log(0.7), -math.log(0.5)]), atol=1e-6)
    kl = 0.8 * math.log(0.8 / 0.5) + 0.1 * math.log(0.1 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    bce = [-math.log(0.5) - math.log(0.7), -math.log(0.3) - math.log(0.5)]
    weighted = [kl * (1 - 0.8), kl * (1 - 0.1)]  # (1 − p_y(x)): the clean-misclassified sample weighs more
    expected = sum(bce) / 2 + 6.0 * sum(weighted) / 2
    assert mart_loss(clean, adv, y, lam=6.0).item() == pytest.approx(expected, rel=1e-6)


def test_trades_attack_raises_the_kl_and_stays_in_the_ball() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.mul_(20)  # confident predictions, so the KL can move
    x = torch.rand(16, 1, 8, 8)
    attack = PGD(eps=0.1, steps=5, step_size=0.03)
    gen = torch.Generator().manual_seed(0)
    x_adv = trades_attack(model, x, attack, generator=gen)
    start = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        kl_start = kl_per_sample(model(x), model(start)).mean().item()
        kl_adv = kl_per_sample(model(x), model(x_adv)).mean().item()
    assert kl_adv > 100 * max(kl_start, 1e-9) and kl_adv > 0.05
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    l2 = trades_attack(model, x, PGD(eps=0.5, steps=3, norm="l2"), generator=gen)
    assert (l2 - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def _state(model: torch.nn.Module, seed: int) -> LoopState:
    return LoopState(model, torch.optim.SGD(model.parameters(), lr=0.1), TrainConfig(), torch.device("cpu"),
                     torch.Generator().manual_seed(seed))


def test_callbacks_add_their_terms_to_the_loop_loss() -> None:
    torch.manual_seed(0)
    model = MLP(64, 4, hidden=(8,)).eval()  # eval: both passes see the same model
    batch = Batch(torch.rand(8, 1, 8, 8), torch.arange(8) % 4, None)
    attack = PGD(eps=0.1, steps=2)
    cb = TRADES(attack, TRADESConfig(beta=3.0))
    same = cb.on_batch(_state(model, 5), batch)
    assert same is batch  # TRADES trains on the clean batch
    logits = model(batch.x)
    got = cb.loss(_state(model, 5), batch, logits, F.cross_entropy(logits, batch.y))
    x_adv = trades_attack(model, batch.x, attack, generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(trades_loss(logits, model(x_adv), batch.y, beta=3.0).item(), rel=1e-6)

    mart = MART(attack, MARTConfig(lam=2.0))
    adv_batch = mart.on_batch(_state(model, 5), batch)
    expected_adv = attack(model, batch.x, batch.y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(adv_batch.x, expected_adv)  # MART trains on the PGD-CE examples
    adv_logits = model(adv_batch.x)
    got = mart.loss(_state(model, 5), adv_batch, adv_logits, F.cross_entropy(adv_logits, batch.y))
    assert got.item() == pytest.approx(mart_loss(model(batch.x), adv_logits, batch.y, lam=2.0).item(), rel=1e-6)
    with pytest.raises(WeightlabError, match="before on_batch"):
        mart.loss(_state(model, 5), adv_batch, adv_logits, got)


def test_config_errors() -> None:
    with pytest.raises(WeightlabError, match="TRADES beta must be a finite number ≥ 0, got -1"):
        TRADESConfig(beta=-1)
    with pytest.raises(WeightlabError, match="MART lam must be a finite number ≥ 0, got inf"):
        MARTConfig(lam=math.inf)


def test_trades_and_mart_train_robust_models_deterministically(digits8) -> None:
    tr, te = digits8
    probe = PGD(eps=0.1, steps=5)
    robust, weights = {}, {}
    for name, cbs in (("std", []), ("trades", [TRADES(PGD(eps=0.1, steps=3))]),
                      ("mart", [MART(PGD(eps=0.1, steps=3))]), ("mart again", [MART(PGD(eps=0.1, steps=3))])):
        torch.manual_seed(0)
        model = SmallCNN(10, width=8)
        train(model, tr, TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0), callbacks=cbs)
        logits, y = adversarial_predict(model, te, probe)
        robust[name] = (logits.argmax(1) == y).float().mean().item()
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert robust["trades"] > robust["std"] + 0.1 and robust["mart"] > robust["std"] + 0.1
    assert torch.equal(weights["mart"], weights["mart again"])  # seeded: the same run twice
