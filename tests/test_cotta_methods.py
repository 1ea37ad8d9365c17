"""Tent, BN-adapt and CoTTA: formulas, configuration, restore, EMA, anchor gate, batched = sequential."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from weightlab.errors import WeightlabError
from weightlab.methods.cotta.cotta import (
    CoTTA,
    CoTTAConfig,
    anchor_threshold_rule,
    collect_params,
    ema_update_,
    soft_cross_entropy,
    stochastic_restore_,
)
from weightlab.methods.cotta.tent import BNAdapt, Tent, TentConfig, configure_model, softmax_entropy
from weightlab.methods.cotta.tent import collect_params as tent_params
from weightlab.methods.cotta.transforms import AugmentParams, _hsv_to_rgb, _rgb_to_hsv, augment, sample_params
from weightlab.models import MLP, SmallCNN, TinyViT


def cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(10, width=8)


def batch(seed: int = 0, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def small(**kw: object) -> CoTTAConfig:
    return CoTTAConfig(n_augmentations=4, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- formulas


def test_softmax_entropy_known_answer() -> None:
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    assert torch.allclose(
        softmax_entropy(logits), torch.tensor([torch.log(torch.tensor(2.0)), 0.0]), atol=1e-6
    )


def test_soft_cross_entropy_known_answer_and_symmetric() -> None:
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[100.0, 0.0]])
    assert torch.allclose(soft_cross_entropy(s, t), torch.log(torch.tensor([2.0])))  # −log ½
    sym = soft_cross_entropy(s, t, symmetric=True)  # ½·log 2 + ½·(−½ log 1 − ½ log e^-100)
    assert torch.allclose(sym, torch.tensor([0.5 * 0.6931472 + 0.5 * 50.0]), atol=1e-4)


def test_ema_update_known_answer() -> None:
    teacher, student = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema_update_(teacher, student, 0.75)
    assert torch.allclose(teacher[0], torch.tensor([1.5, 1.0]))


def test_stochastic_restore_probability() -> None:
    p, p0 = [torch.zeros(20000)], [torch.ones(20000)]
    stochastic_restore_(p, p0, 0.1, generator=torch.Generator().manual_seed(0))
    assert set(p[0].unique().tolist()) == {0.0, 1.0} and abs(float(p[0].mean()) - 0.1) < 0.01


def test_anchor_threshold_rule_known_answer() -> None:
    conf = torch.linspace(0.5, 1.0, 101)  # 5% quantile = 0.525
    assert anchor_threshold_rule(conf) == pytest.approx(0.475, abs=1e-6)


# ---------------------------------------------------------------------------------------------- Tent, BN


def test_tent_configures_only_batchnorm_affine() -> None:
    model = configure_model(cnn())
    params, names = tent_params(model)
    assert names and all(model.get_submodule(n.rsplit(".", 1)[0]).__class__ is nn.BatchNorm2d for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) and model.training
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_tent_lowers_entropy_and_resets() -> None:
    tent = Tent(cnn(), TentConfig(lr=1e-2))
    x = batch()

    def entropy() -> float:
        with torch.no_grad():
            return float(softmax_entropy(tent.model(x)).mean())

    before = entropy()
    for _ in range(5):
        tent(x)
    assert entropy() < before
    tent.reset()
    assert entropy() == pytest.approx(before, rel=1e-5)


def test_bn_adapt_uses_batch_statistics() -> None:
    model = cnn().eval()
    x = batch() * 0.2 + 0.7  # shifted inputs: batch statistics differ from the running ones
    source = model(x)
    adapted = BNAdapt(model)(x)
    ref = cnn().train()  # the same model in train mode normalises with the batch statistics
    with torch.no_grad():
        expected = ref(x)
    assert torch.allclose(adapted, expected, atol=1e-5) and not torch.allclose(adapted, source, atol=1e-3)


@pytest.mark.parametrize("build", [lambda m: Tent(m), lambda m: BNAdapt(m)])
def test_model_without_normalisation_is_refused(build) -> None:
    with pytest.raises(WeightlabError, match="adapts normalisation layers, but the model MLP has none"):
        build(MLP(256, 10, hidden=(16,)))
    with pytest.raises(WeightlabError, match="has none"):
        build(SmallCNN(10, width=8, batchnorm=False))


def vit(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(10, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2)


def test_tent_on_a_vit_adapts_only_the_layernorm_affine_parameters() -> None:
    tent = Tent(vit(), TentConfig(lr=1e-2))
    layernorms = {n for n, m in tent.model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert {n.rsplit(".", 1)[0] for n in tent.param_names} == layernorms == {"blocks.0.norm1", "blocks.0.norm2",
                                                                            "norm"}
    assert {n for n, p in tent.model.named_parameters() if p.requires_grad} == set(tent.param_names)
    x = batch()
    before = {n: p.detach().clone() for n, p in tent.model.named_parameters()}
    with torch.no_grad():
        entropy0 = float(softmax_entropy(tent.model(x)).mean())
    for _ in range(5):
        tent(x)
    with torch.no_grad():
        assert float(softmax_entropy(tent.model(x)).mean()) < entropy0
    moved = {n for n, p in tent.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(tent.param_names)
    tent.reset()
    assert all(torch.equal(p, before[n]) for n, p in tent.model.named_parameters())


def test_tent_adapts_groupnorm_and_the_choice_of_layers() -> None:
    torch.manual_seed(0)
    gn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    assert Tent(gn).param_names == ["1.weight", "1.bias"]
    mixed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.LayerNorm(4 * 14 * 14), nn.Linear(4 * 14 * 14, 10))
    assert tent_params(mixed)[1] == ["1.weight", "1.bias"]  # auto: BatchNorm when there is any (the reference)
    assert tent_params(mixed, norm_layers="all")[1] == ["1.weight", "1.bias", "2.weight", "2.bias",
                                                        "4.weight", "4.bias"]
    with pytest.raises(WeightlabError, match="adapts BatchNorm layers, but the model TinyViT has none"):
        Tent(vit(), TentConfig(norm_layers="batchnorm"))
    with pytest.raises(WeightlabError, match="norm_layers must be one of auto, batchnorm, all"):
        TentConfig(norm_layers="layer")  # type: ignore[arg-type]


def reference_tent_logits(model: nn.Module, batches: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """The official Tent (``DequanWang/tent:tent.py``: configure_model, collect_params, forward_and_adapt),
    written out here as the reference for BatchNorm models."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d)
              for name, p in m.named_parameters() if name in ("weight", "bias")]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    out = []
    for x in batches:
        logits = model(x)
        softmax_entropy(logits).mean(0).backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(logits.detach())
    return out


def test_tent_on_batchnorm_models_is_bit_identical_to_the_reference() -> None:
    batches = [batch(seed) for seed in range(4)]
    tent = Tent(cnn(), TentConfig(lr=1e-2))
    ours = [tent(x) for x in batches]
    for a, b in zip(ours, reference_tent_logits(cnn(), batches, lr=1e-2), strict=True):
        assert torch.equal(a, b)


def test_bn_adapt_on_a_layernorm_model_is_the_source_model() -> None:
    model = vit().eval()
    x = batch()
    with torch.no_grad():
        source = model(x)
    with pytest.warns(UserWarning, match="TinyViT has no BatchNorm"):
        adapt = BNAdapt(model)
    assert torch.equal(adapt(x), source)


@pytest.mark.parametrize(
    "kw, match",
    [({"lr": 0.0}, "lr must be > 0"), ({"steps": 0}, "steps"), ({"optimizer": "lbfgs"}, "optimizer")],
)
def test_tent_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(WeightlabError, match=match):
        TentConfig(**kw)


# ---------------------------------------------------------------------------------------------- CoTTA


def test_cotta_trains_every_weight_and_bias() -> None:
    wrapper = CoTTA(cnn(), small())
    names = set(collect_params(wrapper.model)[1])
    assert names == {n for n, _ in wrapper.model.named_parameters()} and wrapper.model.training
    assert all(not p.requires_grad for p in wrapper.teacher.parameters())


def test_restore_probability_one_returns_to_source() -> None:
    wrapper = CoTTA(cnn(), small(restore_prob=1.0, anchor_threshold=0.0))
    source = {k: v.clone() for k, v in wrapper.model.state_dict().items()}
    wrapper(batch())
    assert all(torch.equal(v, source[k]) for k, v in wrapper.model.state_dict().items())


def test_restore_probability_zero_keeps_every_update() -> None:
    wrapper = CoTTA(cnn(), small(restore_prob=0.0, anchor_threshold=0.0))
    source = {k: v.clone() for k, v in wrapper.model.named_parameters()}
    wrapper(batch())
    for name, p in wrapper.model.named_parameters():
        assert (p != source[name]).float().mean() > 0.9, name  # Adam moves (almost) every element


def test_teacher_moves_by_the_ema_rule() -> None:
    wrapper = CoTTA(cnn(), small(restore_prob=0.0, anchor_threshold=0.0, ema_momentum=0.9))
    teacher_before = [p.clone() for p in wrapper.teacher.parameters()]
    wrapper(batch())
    for t0, t, s in zip(
        teacher_before, wrapper.teacher.parameters(), wrapper.model.parameters(), strict=True
    ):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7)
        assert not torch.equal(t, t0)


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_confident_anchor_runs_no_augmentation() -> None:
    wrapper = CoTTA(cnn(), small(anchor_threshold=0.0))  # every batch is confident enough
    calls = count_calls(wrapper.teacher)
    out = wrapper(batch())
    assert calls[0] == 1 and wrapper.augmented_steps == 0
    unconfident = CoTTA(cnn(), small(anchor_threshold=1.0))
    calls = count_calls(unconfident.teacher)
    out_aug = unconfident(batch())
    assert calls[0] == 4 and unconfident.augmented_steps == 1  # the 4 augmented passes, no plain pass
    assert not torch.allclose(out, out_aug)


def test_prediction_is_the_teacher_output() -> None:
    wrapper = CoTTA(cnn(), small(anchor_threshold=0.0))
    x = batch()
    with torch.no_grad():
        expected = wrapper.teacher(x)
    assert torch.allclose(wrapper(x), expected)


def test_batched_and_sequential_forms_agree() -> None:
    runs = {}
    for mode in ("batched", "sequential"):
        wrapper = CoTTA(cnn(), small(anchor_threshold=1.0, augmentation=mode, augment_chunk=3))
        runs[mode] = [wrapper(batch(i)) for i in range(3)]
        runs[mode].append(torch.cat([p.flatten() for p in wrapper.teacher.parameters()]))
    for a, b in zip(runs["batched"], runs["sequential"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_always_augment_changes_cost_not_outputs() -> None:
    outs = {}
    for always in (False, True):
        wrapper = CoTTA(cnn(), small(anchor_threshold=0.0, always_augment=always))
        outs[always] = [wrapper(batch(i)) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True], strict=True))


def test_reset_restores_student_teacher_anchor_and_optimiser() -> None:
    wrapper = CoTTA(cnn(), small(anchor_threshold=1.0))
    x = batch()
    first = wrapper(x)
    wrapper(batch(1))
    wrapper.reset()
    assert torch.allclose(wrapper.teacher(x), wrapper.anchor(x))
    assert not wrapper.optimizer.state  # fresh Adam moments
    assert wrapper.step_count == 0 and wrapper.augmented_steps == 0
    assert torch.allclose(wrapper(x), first, atol=1e-6)


def test_a_reset_model_draws_the_same_augmentations_and_masks_as_a_new_one() -> None:
    """After ``reset()`` a wrapper replays a new wrapper's stream exactly: same augmented targets (the
    anchor is never confident at threshold 1) and same restore masks, batch after batch."""
    x = [batch(i) for i in range(3)]
    used = CoTTA(cnn(), small(anchor_threshold=1.0, restore_prob=0.5))
    for b in x:
        used(b)
    used.reset()
    new = CoTTA(cnn(), small(anchor_threshold=1.0, restore_prob=0.5))
    for b in x:
        assert torch.equal(used(b), new(b))
    assert all(torch.equal(p, q) for p, q in zip(used.model.parameters(), new.model.parameters(), strict=True))
    assert (used.step_count, used.augmented_steps) == (new.step_count, new.augmented_steps) == (3, 3)


def test_episodic_mode_resets_before_each_batch() -> None:
    wrapper = CoTTA(cnn(), small(anchor_threshold=0.0, episodic=True))
    x = batch()
    a, b = wrapper(x), wrapper(x)
    assert torch.allclose(a, b, atol=1e-6)


def test_imagenet_variant() -> None:
    cfg = CoTTAConfig.imagenet()
    assert (
        cfg.optimizer,
        cfg.lr,
        cfg.nesterov,
        cfg.restore_prob,
        cfg.anchor_threshold,
        cfg.symmetric_loss,
    ) == ("sgd", 0.01, True, 0.001, 0.1, True)
    assert isinstance(CoTTA(cnn(), dataclasses.replace(cfg, n_augmentations=2)).optimizer, torch.optim.SGD)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"restore_prob": 1.5}, "restore_prob"),
        ({"lr": -1.0}, "lr"),
        ({"n_augmentations": 0}, "n_augmentations"),
        ({"augmentation": "gpu"}, "augmentation"),
        ({"anchor_threshold": 2.0}, "anchor_threshold"),
    ],
)
def test_cotta_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(WeightlabError, match=f"CoTTAConfig: {match}"):
        CoTTAConfig(**kw)


# ---------------------------------------------------------------------------------------------- augmentations


def identity_params(x: torch.Tensor) -> AugmentParams:
    one, zero = torch.ones(1), torch.zeros(1)
    return AugmentParams(
        order=torch.arange(5).view(1, 5),
        brightness=one,
        contrast=one,
        saturation=one,
        hue=zero,
        gamma=one,
        angle=zero,
        translate=torch.zeros(1, 2),
        scale=one,
        sigma=torch.full((1,), 1e-3),
        flip=torch.zeros(1, dtype=torch.bool),
        noise=torch.zeros(1, *x.shape),
    )


def test_identity_augmentation_returns_the_input() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    assert torch.allclose(augment(x, identity_params(x))[0], x, atol=1e-5)
    flipped = dataclasses.replace(identity_params(x), flip=torch.ones(1, dtype=torch.bool))
    assert torch.allclose(augment(x, flipped)[0], x.flip(-1), atol=1e-5)


def test_crop_first_equals_the_reference_order_and_copies_are_independent() -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = sample_params(5, tuple(x.shape), generator=torch.Generator().manual_seed(1))
    fast, reference = augment(x, params), augment(x, params, crop_first=False)
    assert torch.allclose(fast, reference, atol=1e-6)
    assert torch.equal(fast[3], augment(x, params.select(3))[0])


def test_non_square_images_are_refused() -> None:
    x = torch.rand(2, 1, 8, 12)
    params = sample_params(2, tuple(x.shape), generator=torch.Generator().manual_seed(0))
    with pytest.raises(WeightlabError, match="square images of side ≥ 4, got 8×12"):
        augment(x, params)


def test_hsv_round_trip_and_hue_shift() -> None:
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_hsv_to_rgb(*_rgb_to_hsv(x)), x, atol=1e-6)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    h, s, v = _rgb_to_hsv(red)
    assert torch.allclose(
        _hsv_to_rgb(h + 1 / 3, s, v), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-6
    )


def test_flip_probability_zero_never_flips() -> None:
    params = sample_params(64, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0), flip_prob=0.0)
    assert not params.flip.any()
    params = sample_params(64, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert 10 < int(params.flip.sum()) < 54


def test_adaptation_is_deterministic_for_its_seed_and_the_seed_matters() -> None:
    """The augmentations and restore masks come from ``config.seed`` alone: the same seed replays a stream
    bit for bit (outputs and adapted weights), another seed gives another adaptation."""

    def adapt(seed: int, global_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        wrapper = CoTTA(cnn(), small(anchor_threshold=1.0, seed=seed))  # always the augmented teacher
        torch.manual_seed(global_seed)  # the global generator must not matter
        outputs = torch.stack([wrapper(batch(i)) for i in range(3)])  # (3, B, classes)
        return outputs, torch.cat([p.flatten() for p in wrapper.model.parameters()])

    (out_a, weights_a), (out_b, weights_b), (out_c, weights_c) = adapt(1, 0), adapt(1, 99), adapt(2, 0)
    assert torch.equal(out_a, out_b) and torch.equal(weights_a, weights_b)
    assert not torch.equal(out_a, out_c) and not torch.equal(weights_a, weights_c)
