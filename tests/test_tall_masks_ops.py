"""Known-answer and property tests of the merging functions (paper key ``tall-masks``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlab import merging
from weightlab.errors import WeightlabError
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.streaming import combine
from weightlab.weights import merge_ops

T_ = torch.tensor


def test_task_vectors_and_task_arithmetic_known_answer() -> None:
    base = {"w": T_([1.0, 2.0, 3.0, 4.0]), "n": T_(3)}
    fts = [{"w": T_([2.0, 2.0, 3.0, 0.0]), "n": T_(3)}, {"w": T_([0.0, 2.5, 3.0, 4.5]), "n": T_(5)}]
    taus = merging.task_vectors(base, fts)
    assert list(taus[0]) == ["w"]  # integer buffers are not merged
    torch.testing.assert_close(taus[0]["w"], T_([1.0, 0.0, 0.0, -4.0]))
    torch.testing.assert_close(taus[1]["w"], T_([-1.0, 0.5, 0.0, 0.5]))
    torch.testing.assert_close(merging.task_arithmetic(taus)["w"], T_([0.0, 0.5, 0.0, -3.5]))


def _two_tasks() -> list[dict[str, torch.Tensor]]:
    return [{"a": T_([3.0, -1.0]), "b": T_([0.5, 2.0])}, {"a": T_([1.0, 2.0]), "b": T_([-4.0, 0.1])}]


def test_ties_global_known_answer() -> None:
    # d = 4, density 0.5: threshold = 2nd smallest |τ| per task (1 for both) -> 0.5 and 0.1 are trimmed
    mean = merging.ties_merge(_two_tasks(), density=0.5, reduce="mean", scope="global")
    torch.testing.assert_close(mean["a"], T_([2.0, 2.0]))
    torch.testing.assert_close(mean["b"], T_([-4.0, 2.0]))
    total = merging.ties_merge(_two_tasks(), density=0.5, reduce="sum", scope="global")
    torch.testing.assert_close(total["a"], T_([4.0, 2.0]))
    torch.testing.assert_close(total["b"], T_([-4.0, 2.0]))


def test_ties_tensor_scope_known_answer() -> None:
    # per tensor d = 2, density 0.5: threshold = smallest |τ| -> nothing trimmed
    out = merging.ties_merge(_two_tasks(), density=0.5, reduce="mean", scope="tensor")
    torch.testing.assert_close(out["a"], T_([2.0, 2.0]))
    torch.testing.assert_close(out["b"], T_([-4.0, 1.05]))


def test_trim_keeps_reference_count() -> None:
    x = torch.arange(1.0, 11.0).unsqueeze(0)  # |τ| = 1..10, d = 10, density 0.2 -> rank 8 -> keep 8, 9, 10
    thr = merge_ops.trim_thresholds(x, 0.2)
    assert thr.item() == 8.0
    assert int((merge_ops.trim(x, thr) != 0).sum()) == 3
    assert merge_ops.trim_thresholds(x, 1.0).item() == 0.0  # density 1 keeps everything


def test_sign_election_zero_takes_majority() -> None:
    trimmed = T_([[1.0, 2.0], [-1.0, 1.0]])  # column 0 sums to 0; majority sign is +1
    sign = merge_ops.elect_sign(trimmed)
    torch.testing.assert_close(sign, T_([1.0, 1.0]))
    torch.testing.assert_close(merge_ops.disjoint_merge(trimmed, sign, "mean"), T_([1.0, 1.5]))
    torch.testing.assert_close(merge_ops.disjoint_merge(trimmed, sign, "sum"), T_([1.0, 3.0]))
    torch.testing.assert_close(merge_ops.elect_sign(trimmed, majority=-1.0), T_([-1.0, 1.0]))


def test_tall_mask_known_answer_and_strictness() -> None:
    tau, merged = T_([1.0, -2.0, 0.5, 0.0, 1.0]), T_([1.5, -1.0, 2.0, 0.0, 3.0])
    # |τ| = [1, 2, .5, 0, 1];  0.5·|merged − τ| = [.25, .5, .75, 0, 1]
    (mask,) = merging.tall_masks([{"w": tau}], {"w": merged}, 0.5)
    assert mask["w"].tolist() == [True, True, False, False, False]  # equality (last two) is not enough


def test_consensus_and_agreement_known_answer() -> None:
    rows = [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]
    masks = [{"w": T_(r, dtype=torch.bool)} for r in rows]
    assert merging.mask_agreement(masks)["w"].tolist() == [3, 1, 1, 0]
    assert merging.consensus_mask(masks, k=2)["w"].tolist() == [True, False, False, False]
    assert merging.consensus_mask(masks, k=1)["w"].tolist() == [True, True, True, False]
    assert merging.agreement_histogram(merging.mask_agreement(masks), 3) == [1, 2, 0, 1]


def test_apply_known_answer_keeps_dtype_and_copies_other_keys() -> None:
    base = {"w": T_([1.0, 2.0], dtype=torch.float16), "idx": T_([7, 8])}
    out = merging.apply(base, {"w": T_([1.0, 1.0])}, 0.5, {"w": T_([True, False])})
    assert out["w"].dtype == torch.float16 and out["w"].tolist() == [1.5, 2.0]
    assert out["idx"].tolist() == [7, 8] and out["idx"] is not base["idx"]


def test_magnitude_masks_known_answer() -> None:
    (mask,) = merging.magnitude_masks([{"a": T_([1.0, -5.0, 2.0]), "b": T_([4.0, 0.5])}], density=0.4)
    # d = 5, density 0.4 -> rank 3: 3rd smallest |τ| = 2 -> keep 2, 4, 5
    assert mask["a"].tolist() == [False, True, True] and mask["b"].tolist() == [True, False]


def test_pack_bits_known_answer() -> None:
    packed = merge_ops.pack_bits(T_([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool))
    assert packed.tolist() == [0b10110000, 0b10000000]


def test_select_lambdas_and_alpha_known_answer() -> None:
    base = {"w": T_([0.0, 0.0])}
    taus = [{"w": T_([1.0, 0.5])}, {"w": T_([0.0, 1.0])}]
    tau = merging.task_arithmetic(taus)  # [1, 1.5]
    # task 0 keeps entry 1 only while 0.5 > λ·1; its score prefers dropping it -> λ = 0.5 (first best)
    # task 1's score does not depend on λ -> the first value of the grid
    lams, masks, _ = merging.select_lambdas(
        base, tau, taus, lambda t, s: -s["w"][1].item() if t == 0 else 1.0
    )
    assert lams == [0.5, 0.2]
    assert masks[0]["w"].tolist() == [True, False]
    alpha, score = merging.select_alpha(
        base, {"w": T_([1.0, 0.0])}, lambda s: [1 - abs(s["w"][0].item() - 0.3)], [1.0]
    )
    assert alpha == 0.3 and score == pytest.approx(1.0)


def test_tall_masks_class_extracts_masked_models() -> None:
    base = {"w": torch.zeros(6)}
    fts = [
        {"w": T_([1.0, 0, 0, 0, 0, 0.1])},
        {"w": T_([0, 1.0, 0, 0, 0, 0.1])},
        {"w": T_([0, 0, 1.0, 0, 0, 0.1])},
    ]
    tall = merging.TallMasks(merging.TallMasksConfig(k=2)).fit(
        base, fts, lambda t, s: -float(s["w"].abs().sum())
    )
    torch.testing.assert_close(tall.extract(0)["w"], T_([1.0, 0, 0, 0, 0, 0]))
    # the shared entry 5 (0.1 in every task) is not active anywhere: its own change is below λ·0.2
    torch.testing.assert_close(tall.consensus_vector(k=1)["w"], T_([1.0, 1.0, 1.0, 0, 0, 0]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: merging.ties_merge(_two_tasks(), density=0.0), "density must be in"),
        (lambda: merging.ties_merge(_two_tasks(), reduce="median"), "reduce must be one of"),
        (lambda: merging.ties_merge(_two_tasks(), scope="layer"), "scope must be one of"),
        (lambda: merging.consensus_mask([{"w": T_([True])}], k=-1), "k must be an integer"),
        (lambda: merging.tall_masks(_two_tasks(), _two_tasks()[0], [0.5]), "one lambda per task"),
        (lambda: merging.tall_masks(_two_tasks(), _two_tasks()[0], -1.0), "lambda must be"),
        (lambda: merging.task_vectors({"w": T_([1.0])}, [{"w": T_([float("nan")])}]), "NaN/Inf"),
        (lambda: merging.task_vectors({"w": T_([1.0])}, [{"v": T_([1.0])}]), "does not match the base in 2"),
        (lambda: merging.apply({"w": T_([1.0])}, {"w": T_([1.0])}, float("inf")), "alpha must be"),
        (lambda: merging.TallMasksConfig(merge="dare"), "merge must be one of"),
    ],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(WeightlabError, match=match):
        call()


# ------------------------------------------------------------------------------------------ properties

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3)


@st.composite
def vectors(draw, n_tasks: int | None = None):
    t = n_tasks or draw(st.integers(2, 4))
    keys = draw(st.lists(shapes, min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    return [{f"k{i}": torch.randn(*s, generator=gen) for i, s in enumerate(keys)} for _ in range(t)]


@settings(max_examples=25, deadline=None)
@given(
    vectors(), st.floats(0.05, 1.0), st.sampled_from(["mean", "sum"]), st.sampled_from(["global", "tensor"])
)
def test_functions_leave_inputs_unchanged(taus, density: float, reduce: str, scope: str) -> None:
    base = {k: torch.randn(v.shape) for k, v in taus[0].items()}
    before = copy.deepcopy((base, taus))
    tau = merging.task_arithmetic(taus)
    merging.ties_merge(taus, density=density, reduce=reduce, scope=scope)
    masks = merging.tall_masks(taus, tau, 0.4)
    merging.apply(base, tau, 0.3, merging.consensus_mask(masks, 2))
    merging.task_vectors(base, [{k: base[k] + v[k] for k in v} for v in taus])
    for a, b in zip([base, *taus], [before[0], *before[1]], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


@settings(max_examples=25, deadline=None)
@given(vectors(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_alpha_zero_gives_the_base(taus, dtype: torch.dtype) -> None:
    base = {k: torch.randn(v.shape).to(dtype) for k, v in taus[0].items()}
    out = merging.apply(base, merging.task_arithmetic(taus), 0.0)
    assert all(torch.equal(out[k], base[k]) and out[k].dtype == dtype for k in base)


@settings(max_examples=25, deadline=None)
@given(vectors(), st.floats(0.1, 2.0))
def test_consensus_k_zero_keeps_all_and_k_above_t_keeps_nothing(taus, lam: float) -> None:
    masks = merging.tall_masks(taus, merging.task_arithmetic(taus), lam)
    assert all(bool(m.all()) for m in merging.consensus_mask(masks, 0).values())
    assert not any(bool(m.any()) for m in merging.consensus_mask(masks, len(taus) + 1).values())
    counts = merging.mask_agreement(masks)
    assert sum(merging.agreement_histogram(counts, len(taus))) == sum(v.numel() for v in counts.values())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**16))
def test_pack_bits_round_trip_and_numpy_order(n: int, seed: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = merge_ops.pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(merge_ops.unpack_bits(packed, (n,)), mask)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 400), st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_radix_select_equals_kthvalue(n: int, density: float, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).abs()
    x[: n // 3] = x[n // 4 : n // 4 + n // 3].clone()  # ties
    rank = merge_ops.keep_rank(n, density)
    if rank <= 0:
        return
    expected = x.kthvalue(rank).values.item()
    hi, r = merge_ops.locate_rank(merge_ops.radix_histogram(x), rank)
    lo, _ = merge_ops.locate_rank(merge_ops.radix_histogram(x, prefix=hi), r)
    assert merge_ops.value_from_bits(hi, lo) == expected


@settings(max_examples=25, deadline=None)
@given(
    vectors(),
    st.floats(0.05, 1.0),
    st.integers(0, 4),
    st.sampled_from(["ties", "consensus-ta", "consensus-ties"]),
)
def test_streamed_combine_equals_state_dict_functions(taus, density: float, k: int, method: str) -> None:
    """One tensor at a time (chunked) gives exactly what the state-dict functions give with scope='tensor'."""
    import weightlab.methods.merging.streaming as streaming

    config = MergeConfig(method=method, density=density, k=k, scope="tensor", lambdas=(0.4,))
    mp = pytest.MonkeyPatch()
    mp.setattr(streaming, "CHUNK", 5)
    try:
        got = {
            key: combine(torch.stack([t[key].reshape(-1) for t in taus]), config, lambdas=[0.4] * len(taus))
            for key in taus[0]
        }
    finally:
        mp.undo()
    if method == "ties":
        expected = merging.ties_merge(taus, density=density, reduce="mean", scope="tensor")
    else:
        tau = (
            merging.task_arithmetic(taus)
            if method == "consensus-ta"
            else merging.ties_merge(taus, density=density, reduce="sum", scope="tensor")
        )
        expected = merging.masked(tau, merging.consensus_mask(merging.tall_masks(taus, tau, 0.4), k))
    for key in taus[0]:
        assert torch.equal(got[key], expected[key].reshape(-1))
