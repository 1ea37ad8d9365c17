"""OFQ's activation quantizer (paper key ``ofq``): per-token LSQ steps and learnable shifts (LSQ+ form), known
answers on small tensors, and today's per-tensor LSQ (one autograd node) when both options are off."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.methods.quant.act import ActOptions, OfqActQuantizer, make_act_quantizer, token_step_init
from weightlab.methods.quant.api import QuantConfig, convert, prepare
from weightlab.methods.quant.lsq import LsqActQuantizer
from weightlab.models import TinyViT

TOKEN = ActOptions(per_token=True)
SHIFT = ActOptions(shift=True)
BOTH = ActOptions(per_token=True, shift=True)


def _vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(10, image_size=8, patch_size=4, dim=16, depth=1, num_heads=2)  # 4 patches + cls = 5 tokens


def test_per_token_step_init_is_two_mean_abs_per_token_over_root_qp() -> None:
    x = torch.tensor([[[0.3, -0.7, 1.6, 0.05], [0.9, -2.6, 0.2, 1.2]]])  # (B=1, N=2, C=4)
    q = OfqActQuantizer(3, options=TOKEN)  # Qp = 3
    q(x)
    # mean|x| per token: 2.65/4 and 4.9/4
    torch.testing.assert_close(q.step.detach(), torch.tensor([[2 * 0.6625], [2 * 1.225]]) / math.sqrt(3))
    x4 = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0))  # (B, H, N, d)
    expected = 2 * x4.abs().mean(dim=(0, 1, 3)).unsqueeze(1) / math.sqrt(3)  # (N, 1)
    torch.testing.assert_close(token_step_init(x4, 3), expected)


def test_per_token_forward_and_gradients_known_answer() -> None:
    x = torch.tensor([[[0.3, -0.7, 1.6, 0.05], [0.9, -2.6, 0.2, 1.2]]], requires_grad=True)  # (1, 2, 4)
    q = OfqActQuantizer(2, options=TOKEN)  # signed 2 bits: codes −2 … 1
    q(x)  # initialise, then set the steps by hand
    with torch.no_grad():
        q.step.copy_(torch.tensor([[0.5], [1.0]]))
    out = q(x)
    # token 0: x/s = [0.6, −1.4, 3.2, 0.1] → codes [1, −1, 1 (clamped), 0]; token 1: [0.9, −2.6, 0.2, 1.2] →
    # [1, −2 (clamped), 0, 1 (clamped)]
    torch.testing.assert_close(out.detach(), torch.tensor([[[0.5, -0.5, 0.5, 0.0], [1.0, -2.0, 0.0, 1.0]]]))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]]))
    # ∂/∂s: round(u) − u in range, −Qn / Qp where clamped: token 0: 0.4 + 0.4 + 1 − 0.1 = 1.7,
    # token 1: 0.1 − 2 − 0.2 + 1 = −1.1; gradient scale 1/√(Qp · entries per step) = 1/√(1 · 4) = 0.5
    torch.testing.assert_close(q.step.grad, torch.tensor([[1.7 * 0.5], [-1.1 * 0.5]]))


def test_per_token_gradient_scale_counts_the_batch() -> None:
    x = torch.tensor([[[0.3, -0.7, 1.6, 0.05], [0.9, -2.6, 0.2, 1.2]]])
    single, double = OfqActQuantizer(2, options=TOKEN), OfqActQuantizer(2, options=TOKEN)
    grads = []
    for q, batch in ((single, x), (double, torch.cat([x, x]))):  # the same tokens twice: twice the sum
        q(batch)
        with torch.no_grad():
            q.step.copy_(torch.tensor([[0.5], [1.0]]))
        q(batch).sum().backward()
        grads.append(q.step.grad)
    torch.testing.assert_close(grads[1], grads[0] * 2 / math.sqrt(2))  # 2× the sum, scale 1/√(1·8) vs 1/√(1·4)


def test_shift_forward_and_gradients_known_answer() -> None:
    x = torch.tensor([[[0.3, -0.7, 1.6, 0.05]]], requires_grad=True)  # (B=1, N=1, C=4)
    q = OfqActQuantizer(2, options=SHIFT)  # per-tensor step, per-channel shift
    q(x)
    assert q.shift.shape == (1, 4)
    with torch.no_grad():
        q.step.fill_(0.5)
        q.shift.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.0]]))
    out = q(x)
    # (x − β)/s = [0.4, −1.0, 2.6, 0.1] → codes [0, −1, 1 (clamped), 0] → codes·s + β
    torch.testing.assert_close(out.detach(), torch.tensor([[[0.1, -0.7, 0.8, 0.0]]]))
    upstream = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0, 2.0, 0.0, 4.0]]]))  # none where clamped
    torch.testing.assert_close(q.shift.grad, torch.tensor([[0.0, 0.0, 3.0, 0.0]]))  # only where clamped
    # ∂/∂s = 1·(0 − 0.4) + 2·(−1 + 1) + 3·Qp + 4·(0 − 0.1) = 2.2; per-tensor scale 1/√(Qp·C) = 0.5
    torch.testing.assert_close(q.step.grad, torch.tensor(2.2 * 0.5))


def test_shift_and_per_token_on_heads_match_the_lsq_plus_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(2, 2, 3, 4, generator=gen)).requires_grad_(True)  # (B, H, N, d)
    q = OfqActQuantizer(3, options=BOTH)
    q(x)
    assert q.step.shape == (3, 1) and q.shift.shape == (2, 1, 4)  # per token; per head and channel
    with torch.no_grad():
        q.shift.copy_(0.3 * torch.randn(2, 1, 4, generator=gen))
    upstream = torch.randn(2, 2, 3, 4, generator=gen)
    (q(x) * upstream).sum().backward()
    s, beta = q.step.detach().clone().requires_grad_(True), q.shift.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    g = 1 / math.sqrt(3 * (2 * 2 * 4))  # Qp = 3, 16 entries per token step
    s_scaled = s.detach() + (s * g - (s * g).detach())
    u = ((xr - beta) / s_scaled).clamp(-4, 3)
    ref = (u.round() + (u - u.detach())) * s_scaled + beta
    (ref * upstream).sum().backward()
    torch.testing.assert_close(q(x).detach(), ref.detach())
    for a, b in ((x.grad, xr.grad), (q.step.grad, s.grad), (q.shift.grad, beta.grad)):
        torch.testing.assert_close(a, b)


def test_zero_shift_at_init_gives_lsq_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    x, upstream = 3 * torch.randn(4, 5, 6, generator=gen), torch.randn(4, 5, 6, generator=gen)
    results = []
    for q in (LsqActQuantizer(2), OfqActQuantizer(2, options=SHIFT)):
        xi = x.clone().requires_grad_(True)
        out = q(xi)
        (out * upstream).sum().backward()
        results.append((out.detach(), xi.grad, q.step.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_both_off_keeps_todays_quantizer_and_its_single_autograd_node() -> None:
    assert type(make_act_quantizer(2)) is LsqActQuantizer
    assert type(make_act_quantizer(2, options=ActOptions())) is LsqActQuantizer
    assert isinstance(make_act_quantizer(None, options=BOTH), torch.nn.Identity)
    model = prepare(_vit(), QuantConfig(bits_w=2, bits_a=2)).model
    quantizers = [m for m in model.modules() if isinstance(m, LsqActQuantizer)]
    assert len(quantizers) == 9 and all(type(m) is LsqActQuantizer for m in quantizers)
    nodes = []
    for m in quantizers:
        m.register_forward_hook(lambda _m, _i, out: nodes.append(type(out.grad_fn).__name__))
    model(torch.rand(3, 1, 8, 8))
    assert nodes == ["_LsqQuantizeBackward"] * 9
    assert not any("shift" in k for k in model.state_dict())


@pytest.mark.parametrize("qkr", [False, True])
def test_options_off_train_bit_identical_to_the_default(qkr: bool) -> None:
    base = _vit()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    finals = []
    for config in (QuantConfig(qkr=qkr), QuantConfig(qkr=qkr, act_granularity="tensor", act_shift=False)):
        model = prepare(copy.deepcopy(base), config).model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        finals.append(([p.grad for p in model.parameters()], [p.detach() for p in model.parameters()]))
    for a, b in zip(finals[0][0] + finals[0][1], finals[1][0] + finals[1][1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("qkr", [False, True])
def test_prepared_vit_learns_per_token_steps_and_shifts(qkr: bool) -> None:
    model = prepare(_vit(), QuantConfig(qkr=qkr, act_granularity="token", act_shift=True)).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before the first forward shapes them
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    block = model.blocks[0]
    first = block.attn.input_quantizer if qkr else block.attn.qkv.input_quantizer
    assert first.step.shape == (5, 1) and first.shift.shape == (1, 16)
    assert block.attn.attn_quantizer.step.shape == (5, 1) and block.attn.attn_quantizer.shift is None
    if qkr:
        assert block.attn.key_quantizer.shift.shape == (2, 1, 16)  # per head, per input channel
    head = model.head.input_quantizer
    assert head.step.shape == () and head.shift.shape == (16,)  # (B, C) input: one step, shifted
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("step", "shift"))}
    opt.step()
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.endswith("shift") for n in moved) and any(n.endswith("step") for n in moved)


def test_per_token_state_dict_round_trip_and_convert() -> None:
    config = QuantConfig(qkr=True, act_granularity="token", act_shift=True)
    model = prepare(_vit(), config).model
    x = torch.rand(4, 1, 8, 8)
    model(x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("shift"):
                p.add_(0.05)
    model.eval()
    expected = model(x)
    fresh = prepare(_vit(), config).model  # steps and shifts not yet shaped
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)
    torch.testing.assert_close(convert(fresh)(x), expected)  # integer weights keep the learned steps, shifts


def test_bad_inputs_and_options() -> None:
    q = OfqActQuantizer(2, options=TOKEN)
    with pytest.raises(WeightlabError, match=r"needs \(B, N, C\) inputs, got shape \(4, 3\)"):
        q(torch.randn(4, 3))
    q(torch.randn(2, 5, 3))
    with pytest.raises(WeightlabError, match="initialised for 5 tokens, got an input with 7"):
        q(torch.randn(2, 7, 3))
    with pytest.raises(WeightlabError, match="act_granularity must be one of tensor, token, got 'channel'"):
        QuantConfig(act_granularity="channel")
    with pytest.raises(WeightlabError, match="need bits_a"):
        QuantConfig(bits_a=None, act_shift=True)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), heads=st.booleans())
def test_outputs_lie_on_the_shifted_per_token_grid(seed: int, bits: int, heads: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 2, 4, 5) if heads else (3, 4, 5)
    x = 2 * torch.randn(*shape, generator=gen)
    q = OfqActQuantizer(bits, options=BOTH)
    q(x)
    with torch.no_grad():
        q.shift.copy_(torch.randn(q.shift.shape, generator=gen))
    codes = (q(x).detach() - q.shift.detach()) / q.step.detach()
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.round().min() >= -q.qn and codes.round().max() <= q.qp
