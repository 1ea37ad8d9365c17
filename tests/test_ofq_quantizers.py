"""Known-answer and property tests of the quantizers (LSQ, StatsQ), bit packing, oscillation and CGA math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.methods.quant.cga import cga_trainable_mask
from weightlab.methods.quant.lsq import (
    LsqActQuantizer,
    LsqWeightQuantizer,
    lsq_grad_scale,
    lsq_quantize,
    lsq_range,
)
from weightlab.methods.quant.oscillation import oscillation_step
from weightlab.methods.quant.pack import pack_codes, unpack_codes
from weightlab.methods.quant.statsq import (
    StatsQuantizer,
    statsq,
    statsq_codes,
    statsq_dequantize,
    statsq_scale,
)


def test_statsq_known_answer() -> None:
    w = torch.tensor([[0.1, -0.3, 0.5, -0.9]])  # mean|w| = 0.45, s = 0.9, n = 2
    # positions clamp(w/s)·2 = [0.22, -0.67, 1.11, -2] -> codes [0, -1, 1, -2] -> 0.45·(k + 0.5)
    torch.testing.assert_close(statsq(w, 2), torch.tensor([[0.225, -0.225, 0.675, -0.675]]))
    torch.testing.assert_close(statsq_codes(w, 2), torch.tensor([[0.0, -1.0, 1.0, -2.0]]))


def test_statsq_2bit_levels_are_half_and_one_and_a_half_mean_abs() -> None:
    w = torch.randn(6, 200)
    q = statsq(w, 2)
    for row, qrow in zip(w, q, strict=True):
        m = row.abs().mean()
        levels = torch.unique(qrow)
        torch.testing.assert_close(levels, torch.tensor([-1.5, -0.5, 0.5, 1.5]) * m)


def test_statsq_scale_is_per_row_and_detached() -> None:
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]], requires_grad=True)
    s = statsq_scale(w)
    torch.testing.assert_close(s, torch.tensor([[4.0], [1.0]]))
    assert not s.requires_grad


def test_statsq_straight_through_gradient_is_identity_even_when_clipped() -> None:
    w = torch.tensor([[0.1, -0.2, 5.0, -7.0]], requires_grad=True)  # 5 and -7 are clipped
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (statsq(w, 2) * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)


def test_lsq_gradient_scale_matches_formula() -> None:
    w = torch.tensor([[0.3, -0.7, 1.6, 0.05]], requires_grad=True)
    quantizer = LsqWeightQuantizer(w, 2)  # Qn = 2, Qp = 1
    with torch.no_grad():
        quantizer.step.fill_(0.5)
    out = quantizer(w)
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.5, 0.5, 0.0]]))
    out.sum().backward()
    # d out/d s: round(v) - v inside the range, Qp for the clipped 3.2: [0.4, 0.4, 1, -0.1] -> 1.7;
    # g = 1/√(Qp·N) = 1/√(1·4)
    assert lsq_grad_scale(1, 4) == 0.5
    torch.testing.assert_close(quantizer.step.grad, torch.tensor([[1.7 * 0.5]]))
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))  # no gradient when clipped


def test_lsq_init_and_ranges() -> None:
    w = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    q = LsqWeightQuantizer(w, 3)  # Qp = 3
    torch.testing.assert_close(q.step, torch.tensor([[2 * 1.5 / math.sqrt(3)]]))
    assert lsq_range(2, signed=True) == (2, 1) and lsq_range(2, signed=False) == (0, 3)
    act = LsqActQuantizer(2, signed=False)
    x = torch.tensor([[0.0, 0.5, 1.0, 3.0]])
    out = act(x)  # step initialised to 2·mean|x|/√3
    step = 2 * 1.125 / math.sqrt(3)
    torch.testing.assert_close(out, (x / step).clamp(0, 3).round() * step)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 8))
def test_statsq_quantize_dequantize_is_idempotent(seed: int, bits: int) -> None:
    w = torch.randn(5, 17, generator=torch.Generator().manual_seed(seed)) * 3
    scale = statsq_scale(w)
    codes = statsq_codes(w, bits, scale)
    again = statsq_codes(statsq_dequantize(codes, scale, bits), bits, scale)
    assert torch.equal(codes, again)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8))
def test_lsq_quantize_is_idempotent(seed: int, bits: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 9, generator=gen)
    step = torch.rand(4, 1, generator=gen) * 0.5 + 0.01
    qn, qp = lsq_range(bits, signed=True)
    once = lsq_quantize(w, step, qn=qn, qp=qp, g=1.0)
    torch.testing.assert_close(lsq_quantize(once, step, qn=qn, qp=qp, g=1.0), once)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 8), numel=st.integers(1, 50))
def test_pack_unpack_roundtrip(seed: int, bits: int, numel: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (numel,), generator=gen).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (numel,)), codes)


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(WeightlabError, match="2-bit range"):
        pack_codes(torch.tensor([2]), 2)


def test_oscillation_step_known_answer() -> None:
    # weight 0: 0 -> 1 -> 0 (flip back at step 2); weight 1: 0 -> 1 -> 2 (monotone);
    # weight 2: 0 -> 0 -> -1 -> -1 -> 0 (flip back at step 4, after a pause)
    sequence = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, -1.0], [0.0, 2.0, -1.0],
                             [0.0, 2.0, 0.0]])
    direction, ema = torch.zeros(3), torch.zeros(3)
    seen = []
    for prev, cur in zip(sequence[:-1], sequence[1:], strict=True):
        direction, ema, oscillated = oscillation_step(prev, cur, direction, ema, momentum=0.5)
        seen.append(oscillated.tolist())
    assert seen == [[False, False, False], [True, False, False], [False, False, False], [False, False, True]]
    torch.testing.assert_close(ema, torch.tensor([0.125, 0.0, 0.5]))  # 0.5 at step 2, halved twice
    torch.testing.assert_close(direction, torch.tensor([-1.0, 1.0, 1.0]))


def test_cga_mask_known_answer() -> None:
    # mean|w| = 1 so positions are w itself (2 bits: thresholds at -1, 0, 1; ±2 are range ends)
    head = [1.003, -0.004, 0.6, -1.0045]
    w = torch.tensor([head + [5.0 - sum(abs(v) for v in head)]], dtype=torch.float64)
    mask = cga_trainable_mask(w, 2, 0.005)
    assert mask.tolist() == [[True, True, False, True, False]]


def test_cga_trainable_fraction_is_small_for_gaussian_weights() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    fraction = cga_trainable_mask(w, 2, 0.005).float().mean().item()
    assert 0.003 < fraction < 0.012  # ≈ 0.7% at BR 0.005 (spec §2.3)


def test_statsquantizer_codes_reconstruct_forward() -> None:
    w = torch.randn(3, 8)
    q = StatsQuantizer(3)
    codes, scale = q.codes(w)
    torch.testing.assert_close(scale * (codes + q.offset), q(w))


def test_lsq_activation_init_flag_survives_a_state_dict_round_trip():
    from weightlab.methods.quant.lsq import LsqActQuantizer

    q = LsqActQuantizer(2)
    q(torch.full((4, 3), 2.0))
    step = q.step.detach().clone()
    fresh = LsqActQuantizer(2)
    fresh.load_state_dict(q.state_dict())
    fresh(torch.full((4, 3), 100.0))  # already initialised: the step is not re-estimated
    assert torch.equal(fresh.step.detach(), step)
