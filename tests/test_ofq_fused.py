"""The one-node LSQ and StatsQ quantizers give the numbers of their autograd compositions, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from weightlab.errors import WeightlabError
from weightlab.methods.quant import lsq as lsq_mod
from weightlab.methods.quant import statsq as statsq_mod
from weightlab.methods.quant.api import QuantConfig, prepare
from weightlab.methods.quant.lsq import grad_scale, lsq_quantize, round_ste
from weightlab.methods.quant.statsq import statsq, statsq_codes, statsq_dequantize, statsq_scale
from weightlab.models import TinyViT


def composed_lsq(x: torch.Tensor, step: torch.Tensor, *, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ as it was written before the one-node version (the reference)."""
    s = grad_scale(step.clamp_min(1e-5), g)
    return round_ste((x / s).clamp(-qn, qp)) * s


def composed_statsq(weight: torch.Tensor, bits: int) -> torch.Tensor:
    scale = statsq_scale(weight)
    return statsq_dequantize(statsq_codes(weight, bits, scale), scale, bits) + (weight - weight.detach())


def run(fn, x: torch.Tensor, step: torch.Tensor, upstream: torch.Tensor, **kw):
    x, step = x.detach().clone().requires_grad_(True), step.detach().clone().requires_grad_(True)
    out = fn(x, step, **kw)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, step.grad


@pytest.mark.parametrize(("shape", "step_shape", "qn", "qp"), [
    ((8, 5, 16), (), 2, 1),  # signed activations, one step
    ((8, 5, 16), (), 0, 3),  # unsigned (attention probabilities)
    ((12, 20), (12, 1), 2, 1),  # a weight, one step per row
    ((12, 20), (12, 1), 128, 127),  # 8 bits
])
def test_one_node_lsq_equals_the_composition_bit_for_bit(shape, step_shape, qn, qp) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (qp + 1) * torch.randn(*shape, generator=gen)  # about 10% beyond the range
    step = torch.rand(step_shape, generator=gen) + 0.1
    upstream = torch.randn(*shape, generator=gen)
    new, old = (run(f, x, step, upstream, qn=qn, qp=qp, g=0.013) for f in (lsq_quantize, composed_lsq))
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)
    assert (new[1] == 0).any() and (new[1] != 0).any()  # some entries clamped, some not


def test_one_node_lsq_on_a_strided_input_and_a_tiny_step() -> None:
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(4, 6, 3, 2, 8, generator=gen).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d), as attention
    x, upstream = qkv[1], torch.randn(4, 2, 6, 8, generator=gen)
    assert not x.is_contiguous()
    for step in (torch.tensor(0.4), torch.tensor(1e-7)):  # below 1e-5 the step gets no gradient
        new, old = run(lsq_quantize, x, step, upstream, qn=2, qp=1, g=0.1), \
            run(composed_lsq, x, step, upstream, qn=2, qp=1, g=0.1)
        assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))
    assert new[2] == 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_one_node_statsq_equals_the_composition_bit_for_bit(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(10, 7, generator=gen)
    upstream = torch.randn(10, 7, generator=gen)
    grads = []
    for fn in (statsq, composed_statsq):
        p = w.clone().requires_grad_(True)
        out = fn(p, bits)
        (out * upstream).sum().backward()
        grads.append((out.detach(), p.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][1], upstream)  # the identity straight-through gradient
    with pytest.raises(WeightlabError, match="bits must be an integer from 1 to 8"):
        statsq(w, 9)


@pytest.mark.parametrize("method", ["lsq", "statsq"])
def test_qat_training_is_identical_with_the_composed_quantizers(monkeypatch, method: str) -> None:
    torch.manual_seed(0)
    base = TinyViT(10, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    finals = []
    for composed in (False, True):
        if composed:
            monkeypatch.setattr(lsq_mod, "lsq_quantize", composed_lsq)
            monkeypatch.setattr(statsq_mod, "statsq", composed_statsq)
        model = prepare(copy.deepcopy(base), QuantConfig(bits_w=2, bits_a=2, method=method)).model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])
