"""The one-node LSQ and StatsQ quantizers give the numbers of their autograd compositions: the forward bit for
bit, the gradients bit for bit (StatsQ) or up to float rounding (LSQ, whose backward takes fewer passes)."""

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


def same_lsq(new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]) -> bool:
    """Equal outputs, and gradients within float32 rounding (the one-node backward forms ``grad`` where the
    composition forms ``grad·s/s``, and one sum where it forms two)."""
    (out_a, gx_a, gs_a), (out_b, gx_b, gs_b) = new, old
    return (torch.equal(out_a, out_b) and torch.allclose(gx_a, gx_b, rtol=1e-6, atol=1e-7)
            and torch.equal(gx_a == 0, gx_b == 0) and torch.allclose(gs_a, gs_b, rtol=1e-5, atol=1e-7))


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
def test_one_node_lsq_equals_the_composition(shape, step_shape, qn, qp) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (qp + 1) * torch.randn(*shape, generator=gen)  # about 10% beyond the range
    step = torch.rand(step_shape, generator=gen) + 0.1
    upstream = torch.randn(*shape, generator=gen)
    new, old = (run(f, x, step, upstream, qn=qn, qp=qp, g=0.013) for f in (lsq_quantize, composed_lsq))
    assert same_lsq(new, old)
    assert (new[1] == 0).any() and (new[1] != 0).any()  # some entries clamped, some not


def test_one_node_lsq_on_a_strided_input_and_a_tiny_step() -> None:
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(4, 6, 3, 2, 8, generator=gen).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d), as attention
    x, upstream = qkv[1], torch.randn(4, 2, 6, 8, generator=gen)
    assert not x.is_contiguous()
    for step in (torch.tensor(0.4), torch.tensor(1e-7)):  # below 1e-5 the step gets no gradient
        new, old = run(lsq_quantize, x, step, upstream, qn=2, qp=1, g=0.1), \
            run(composed_lsq, x, step, upstream, qn=2, qp=1, g=0.1)
        assert same_lsq(new, old)
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
def test_qat_gradients_match_the_composed_quantizers(monkeypatch, method: str) -> None:
    """A whole QAT model: the same loss bit for bit and every parameter's gradient within float rounding. (A
    few AdamW steps do not stay this close: where a gradient is ~0, a rounding-sized difference changes the
    sign of a normalized update, and a weight near a code boundary then takes another code.)"""
    torch.manual_seed(0)
    base = TinyViT(10, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    losses, grads = [], []
    for composed in (False, True):
        if composed:
            monkeypatch.setattr(lsq_mod, "lsq_quantize", composed_lsq)
            monkeypatch.setattr(statsq_mod, "statsq", composed_statsq)
        model = prepare(copy.deepcopy(base), QuantConfig(bits_w=2, bits_a=2, method=method)).model
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(a is not None for a in grads[0])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_attention_quantizes_q_k_v_in_one_node_with_the_three_nodes_numbers(monkeypatch) -> None:
    from weightlab.methods.quant import layers

    torch.manual_seed(0)
    model = prepare(TinyViT(10, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2),
                    QuantConfig(bits_w=2, bits_a=2)).model
    attn = next(m for m in model.modules() if isinstance(m, layers.QuantAttention))
    x = torch.randn(3, 5, 16)
    attn(x)  # the first batch initialises each of the three steps on its own view (three nodes)
    steps = [attn.q_quantizer.step, attn.k_quantizer.step, attn.v_quantizer.step]
    assert len({float(s.detach()) for s in steps}) == 3 and layers.joinable(
        (attn.q_quantizer, attn.k_quantizer, attn.v_quantizer))
    calls = []
    monkeypatch.setattr(lsq_mod, "lsq_quantize", lambda *a, **k: calls.append(a[0].shape) or lsq_quantize(*a, **k))
    results = []
    for joint in (True, False):
        if not joint:
            monkeypatch.setattr(layers, "joinable", lambda quantizers: False)
        calls.clear()
        xi = x.clone().requires_grad_(True)
        out = attn(xi)
        grads = torch.autograd.grad(out.pow(2).sum(), [xi, *steps])
        results.append((out, *grads, len(calls)))
        assert ((3, 5, 3, 2, 8) in calls) is joint  # one node on the contiguous (B, N, 3, H, hd) qkv
    (out_a, gx_a, *gs_a, nodes_a), (out_b, gx_b, *gs_b, nodes_b) = results
    assert nodes_a == nodes_b - 2
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    for a, b in zip(gs_a, gs_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8) and a != 0


def test_a_hooked_or_uninitialised_quantizer_keeps_the_three_nodes() -> None:
    from weightlab.methods.quant import layers

    model = prepare(TinyViT(10, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2),
                    QuantConfig(bits_w=2, bits_a=2)).model
    attn = next(m for m in model.modules() if isinstance(m, layers.QuantAttention))
    trio = (attn.q_quantizer, attn.k_quantizer, attn.v_quantizer)
    assert not layers.joinable(trio)  # no batch seen yet
    attn(torch.randn(2, 5, 16))
    assert layers.joinable(trio)
    seen = []
    handle = attn.k_quantizer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    assert not layers.joinable(trio)
    attn(torch.randn(2, 5, 16))
    assert seen == [(2, 2, 5, 8)]  # the hook still sees k
    handle.remove()
