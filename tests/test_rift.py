"""RiFT: module robust criticality, fine-tuning one module, the interpolation search, the experiment."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weightlab.cli import main
from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.adversarial.attacks import PGD
from weightlab.methods.rift.rift import (
    RiFT,
    RiFTConfig,
    check_module,
    finetune,
    interpolate,
    interpolation_search,
    module_robust_criticality,
    weight_modules,
)
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig


def test_weight_modules_are_convs_and_linears() -> None:
    assert weight_modules(SmallCNN(10, width=4)) == ["body.0", "body.4", "body.8", "head"]


def test_unknown_module_lists_valid_ones() -> None:
    with pytest.raises(
        WeightlabError,
        match=r"module 'body.1' is not a conv/linear .* valid: body.0, body.4, "
        r"body.8, head",
    ):
        check_module(SmallCNN(10, width=4), "body.1")
    with pytest.raises(WeightlabError, match="'conv9'"):
        module_robust_criticality(
            SmallCNN(10, width=4), ArrayDataset(torch.rand(2, 1, 8, 8), torch.zeros(2)), modules=["conv9"]
        )


def test_mrc_known_answer_on_one_linear_layer() -> None:
    # W0 = I, x = (1, 0), y = 0. A huge ascent step points along (p − e_y) xᵀ ∝ [[−1, 0], [1, 0]]; the
    # projection puts ΔW on the sphere of radius 0.1·‖W0‖ = 0.1·√2, so W = [[0.9, 0], [0.1, 1]]
    # and logits = (0.9, 0.1).
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    data = ArrayDataset(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    mrc = module_robust_criticality(model, data, radius=0.1, epochs=1, lr=1e6)
    expected = math.log1p(math.exp(-0.8)) - math.log1p(math.exp(-1.0))
    assert mrc == {"0": pytest.approx(expected, rel=1e-4)}
    assert torch.equal(model[0].weight, torch.eye(2))  # the input model is untouched
    small = module_robust_criticality(model, data, radius=0.01, epochs=1, lr=1e6)["0"]
    assert 0 < small < mrc["0"]


def test_interpolate_known_answer_and_key_mismatch() -> None:
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(5)}
    out = interpolate(a, b, 0.25)
    assert torch.allclose(out["w"], torch.tensor([0.25, 2.5])) and out["n"].item() == 1
    assert interpolate(a, b, 0.75)["n"].item() == 5
    with pytest.raises(WeightlabError, match="differ in 1 keys"):
        interpolate(a, {"w": b["w"]}, 0.5)


def test_interpolation_search_picks_best_clean_within_tolerance() -> None:
    model = nn.Linear(1, 1, bias=False)

    def evaluate(m: nn.Module) -> tuple[float, float]:
        w = m.weight.item()  # θ_α = α: clean rises with α, robust falls as 0.5 − 0.1 α²
        return w, 0.5 - 0.1 * w * w

    start, end = {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}
    alpha, rows = interpolation_search(model, start, end, evaluate, tolerance=0.02)
    assert alpha == pytest.approx(0.4)  # 0.1·α² ≤ 0.02 ⇔ α ≤ 0.447
    assert model.weight.item() == pytest.approx(0.4) and len(rows) == 11
    assert interpolation_search(model, start, end, evaluate, tolerance=0.0)[0] == 0.0


def test_finetune_moves_only_the_chosen_module(digits8) -> None:
    model = SmallCNN(10, width=4)
    before = {k: v.clone() for k, v in model.named_parameters()}
    tuned = finetune(model, digits8[0], "body.4", TrainConfig(max_steps=3, batch_size=32, lr=0.1))
    changed = {k for k, v in tuned.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"body.4.weight"}  # the conv has no bias next to BatchNorm
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_config_errors() -> None:
    with pytest.raises(WeightlabError, match=r"alphas must be .* in \[0, 1\], got \(0.5, 1.5\)"):
        RiFTConfig(alphas=(0.5, 1.5))
    with pytest.raises(WeightlabError, match="radius must be > 0, got 0"):
        RiFTConfig(radius=0)
    data = ArrayDataset(torch.rand(4, 1, 8, 8), torch.zeros(4))
    with pytest.raises(WeightlabError, match=r"module 'layer2.1.conv2' is not .* valid: body.0"):
        rift = RiFT(RiFTConfig(candidates=("body.0", "layer2.1.conv2")))
        rift.fit(SmallCNN(10, width=4), data, data, PGD())


def test_fit_reuses_a_given_mrc(digits8) -> None:
    model = SmallCNN(10, width=4)
    tr = digits8[0].subset(torch.arange(64))
    given = {"body.0": 0.3, "body.4": 0.1, "body.8": 0.2, "head": 0.05}
    cfg = RiFTConfig(finetune=TrainConfig(max_steps=1, batch_size=32), alphas=(0.0, 1.0),
                     candidates=("body.0", "body.4", "body.8"))
    rift = RiFT(cfg).fit(model, tr, tr, PGD(eps=0.1, steps=1), mrc=given)
    assert rift.mrc_ == given and rift.module_ == "body.4"  # the least critical candidate, nothing re-measured
    with pytest.raises(WeightlabError, match="mrc has no value for candidate 'body.8'"):
        RiFT(cfg).fit(model, tr, tr, PGD(eps=0.1, steps=1), mrc={"body.0": 0.1, "body.4": 0.2})
    with pytest.raises(WeightlabError, match="module 'conv9' is not"):
        RiFT(cfg).fit(model, tr, tr, PGD(eps=0.1, steps=1), mrc={"conv9": 0.1})


def test_experiment_bad_set_value_exits_2(tmp_path) -> None:
    assert (
        main(
            ["run", "rift", "--profile", "smoke", "--out", str(tmp_path / "r"), "--set", "corruptions=fogg"]
        )
        == 2
    )
    for bad in ("bases=TRADES,MART", "bases=AT,AT", "bases=AT,AWP"):  # AT is the reference arm; Table 2 bases
        assert main(["run", "rift", "--profile", "smoke", "--out", str(tmp_path / "b"), "--set", bad]) == 2


def test_rift_smoke_direction(tmp_path) -> None:
    from weightlab.experiments.base import run_experiment

    _, results = run_experiment(
        "rift", profile="smoke", out=tmp_path / "run", overrides={"at_epochs": "3", "finetune_epochs": "2"}
    )
    per_seed = results.records[0]
    metrics = per_seed["metrics"]
    at = per_seed["bases"]["AT"]
    assert set(per_seed["bases"]) == {"AT", "TRADES", "MART"}  # smoke runs every base of Table 2
    for base in per_seed["bases"].values():
        assert set(base["mrc"]) == {"body.0", "body.4", "body.8", "head"}
        assert all(v >= 0 for v in base["mrc"].values())
        search = {row["alpha"]: row for row in base["search"]}  # α keeps validation robustness in tolerance
        assert search[base["alpha"]]["robust"] >= search[0.0]["robust"] - 0.005
    assert per_seed["module_conv"] != "head"  # the ablation reuses AT's MRC over the convolutions only
    # fine-tuning all layers on clean data loses robustness
    assert metrics["FT all (α=1)"]["pgd"] < metrics["AT"]["pgd"]
    # AutoAttack beside PGD on 2 test images per class: a point it counts robust is one the model gets right
    for name in ("AT", "FT all (α=1)", "RiFT", "TRADES", "RiFT on TRADES", "MART", "RiFT on MART"):
        aa = metrics[name]["autoattack"]
        assert aa["n"] == 20 and len(aa["per_class"]) == 10 and aa["robust"] <= aa["clean"]
        assert aa["robust_worst"] <= aa["robust_tail30"] <= aa["robust"] + 1e-9 or aa["robust"] == 0
    assert "autoattack" not in metrics["RiFT (convs only)"]
    assert at["module"] in at["mrc"]
    claims = [c.text for c in results.claims]
    assert sum("RiFT on TRADES" in c for c in claims) == 2 and sum("RiFT on MART" in c for c in claims) == 2
    assert (tmp_path / "run" / "results.md").is_file() and (
        tmp_path / "run" / "plots" / "mrc.png"
    ).is_file()
