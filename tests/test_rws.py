"""Robust weight signatures: projection, quantization, patch / unpatch / compose, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab.errors import WeightlabError
from weightlab.methods.rws.signatures import (
    apply_signatures,
    dequantize,
    extract_signature,
    patch,
    project_out,
    quantize,
    shallow_keys,
    signature_bytes,
    unpatch,
)
from weightlab.models import MLP, SmallCNN


def test_project_out_known_answer() -> None:
    assert torch.allclose(
        project_out(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])), torch.tensor([0.0, 1.0])
    )
    assert torch.equal(project_out(torch.tensor([1.0, 2.0]), torch.zeros(2)), torch.tensor([1.0, 2.0]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=3, max_size=3), st.lists(st.floats(-5, 5), min_size=3, max_size=3)
)
def test_signature_is_orthogonal_to_the_clean_direction(d, a) -> None:
    d, a = torch.tensor(d, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)
    out = project_out(d, a)
    assert abs(torch.dot(out, a).item()) <= 1e-9 * (1 + d.norm().item() * a.norm().item() ** 2)


def test_extract_signature_known_answer() -> None:
    pre = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    clean = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.ones(2)}
    robust = {"w": torch.tensor([[3.0, 4.0], [0.0, 5.0]]), "b": torch.ones(2)}
    sig = extract_signature(pre, clean, robust, ["w", "b"])
    assert torch.equal(sig["w"], torch.tensor([[0.0, 4.0], [0.0, 5.0]]))
    assert torch.equal(sig["b"], torch.zeros(2))  # parallel to the clean direction: nothing left


def test_shallow_keys() -> None:
    model = SmallCNN(10, width=4, batchnorm=False)
    assert shallow_keys(model, 2) == ["body.0.weight", "body.0.bias", "body.4.weight", "body.4.bias"]
    with pytest.raises(WeightlabError, match="k must be between 1 and the 4 conv/linear modules, got 5"):
        shallow_keys(model, 5)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), codes=st.lists(st.integers(0, 255), min_size=1, max_size=40))
def test_bit_packing_round_trip(bits, codes) -> None:
    # values on the quantization grid (0 and 2^b − 1 present, so the step is 1) come back exactly
    c = torch.tensor([0, *codes, 2**bits - 1]) % (2**bits)
    c[-1] = 2**bits - 1
    q = quantize(c.float(), bits)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(c.numel() * bits / 8)
    assert torch.equal(dequantize(q), c.float())


def test_quantize_known_answer_and_error_bound() -> None:
    q = quantize(torch.tensor([[-1.0, 0.0], [1.0, 1.0]]), 1)  # two levels: -1 and 1; 0 rounds to a level
    assert set(dequantize(q).flatten().tolist()) <= {-1.0, 1.0} and q.nbytes == 1 + 8
    x = torch.randn(1000)
    q8 = quantize(x, 8)
    step = (x.max() - x.min()).item() / 255
    assert (dequantize(q8) - x).abs().max().item() <= step / 2 + 1e-6
    assert signature_bytes({"x": q8}) == 1000 + 8 and signature_bytes({"x": x}) == 4000
    with pytest.raises(WeightlabError, match="bits must be between 1 and 8, got 9"):
        quantize(x, 9)


def _signature(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.37 * torch.randn(model.state_dict()[k].shape, generator=g) for k in shallow_keys(model, 2)}


def test_patch_unpatch_is_bitwise_and_compose_adds() -> None:
    model = SmallCNN(10, width=4, batchnorm=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = _signature(model, 0), _signature(model, 1)
    handle = patch(model, [a, b], [0.3, 1.7])
    after = model.state_dict()
    expected = apply_signatures(before, [a, b], [0.3, 1.7])
    assert all(torch.allclose(after[k], expected[k]) for k in before)
    assert torch.allclose(
        after["body.0.weight"],
        before["body.0.weight"] + 0.3 * a["body.0.weight"] + 1.7 * b["body.0.weight"],
    )
    assert torch.equal(after["body.8.weight"], before["body.8.weight"])  # unsigned layers untouched
    unpatch(model, handle)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_signature_from_another_architecture_names_the_keys() -> None:
    wide, narrow = SmallCNN(10, width=8, batchnorm=False), SmallCNN(10, width=4, batchnorm=False)
    with pytest.raises(
        WeightlabError,
        match=r"another shape \(first: 'body.0.weight' \(8, 1, 3, 3\) vs "
        r"\(4, 1, 3, 3\)\)",
    ):
        patch(narrow, [_signature(wide, 0)])
    with pytest.raises(WeightlabError, match=r"keys the model lacks \(first: \['body.0.weight'"):
        patch(MLP(64, 10, hidden=(8,)), [_signature(narrow, 0)])
    with pytest.raises(WeightlabError, match="2 signatures but 1 scales"):
        patch(narrow, [_signature(narrow, 0)] * 2, [1.0])


def test_rws_smoke_experiment(tmp_path) -> None:
    from weightlab.experiments.base import run_experiment

    _, results = run_experiment("rws", profile="smoke", out=tmp_path / "run")
    claims = {c.text.split(" ")[0]: c for c in results.claims}
    assert claims["unpatch"].direction and results.records[0]["unpatch_max_abs_diff"] == 0.0
    storage = results.records[0]["storage"]
    assert storage["full copy (bytes)"] / storage["8-bit signature (bytes)"] >= 8
