"""CoTTA's speed-ups leave every number as it was: pair pooling, the colour-jitter fast path, whole runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightlab.methods.cotta import cotta as cotta_mod
from weightlab.methods.cotta.cotta import CoTTA, CoTTAConfig, PairMaxPool2d, use_inference_ops_
from weightlab.methods.cotta.transforms import AugmentParams, _colour_op, colour_jitter, sample_params
from weightlab.models import SmallCNN


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (5, 6, 6)])
def test_pair_pooling_gives_exactly_max_pool_2x2(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[::7] = 0.0  # ties
    x.view(-1)[3] = float("nan")
    x.view(-1)[10] = float("-inf")
    with torch.no_grad():
        got, ref = PairMaxPool2d()(x), nn.MaxPool2d(2)(x)
    assert got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_pair_pooling_falls_back_to_max_pool_where_a_gradient_is_needed() -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    PairMaxPool2d()(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.max_pool2d(x2, 2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_only_plain_2x2_stride_2_pools_are_replaced() -> None:
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d((2, 2), stride=2), nn.MaxPool2d(3),
                          nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2, stride=1), nn.Sequential(nn.MaxPool2d(2)))
    use_inference_ops_(model)
    kinds = [type(m).__name__ for m in model[:5]] + [type(model[5][0]).__name__]
    assert kinds == ["PairMaxPool2d", "PairMaxPool2d", "MaxPool2d", "MaxPool2d", "MaxPool2d", "PairMaxPool2d"]


def old_colour_jitter(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """The colour jitter before its fast path (the reference): every op through an index search per position."""
    factors = (params.brightness, params.contrast, params.saturation, params.hue, params.gamma)
    for position in range(5):
        out = x.clone()
        for op in range(5):
            idx = (params.order[:, position] == op).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = _colour_op(x[idx], op, factors[op][idx].view(-1, 1, 1, 1, 1))
        x = out
    return x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("copies", [1, 8])
def test_colour_jitter_is_bit_for_bit_the_index_search_version(channels: int, copies: int) -> None:
    x = torch.rand(4, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    params = sample_params(copies, tuple(x.shape), generator=torch.Generator().manual_seed(copies))
    stacked = x.unsqueeze(0).expand(copies, *x.shape)
    assert torch.equal(colour_jitter(stacked, params), old_colour_jitter(stacked, params))
    if copies > 1:
        assert len({tuple(r) for r in params.order.tolist()}) > 1  # the mixed-order branch ran


@pytest.mark.parametrize("always_augment", [False, True])
def test_cotta_predictions_are_identical_with_and_without_the_speed_ups(monkeypatch, always_augment) -> None:
    stream = [torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = CoTTAConfig(n_augmentations=4, anchor_threshold=0.5, always_augment=always_augment, flip_prob=0.0,
                         augmentation="sequential")
    outs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(cotta_mod, "use_inference_ops_", lambda m: m)
        torch.manual_seed(0)
        wrapper = CoTTA(SmallCNN(10, width=8), config)
        assert any(isinstance(m, PairMaxPool2d) for m in wrapper.teacher.modules()) == fast
        outs.append([wrapper(x) for x in stream] + [torch.cat([p.flatten() for p in wrapper.model.parameters()])])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
