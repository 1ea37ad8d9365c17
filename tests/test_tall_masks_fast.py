"""The fast streamed merge (``tall-masks``): radix thresholds against torch's selection, the fused TIES
chunk against the reference formulas, column workers, the read-ahead arena, and errors during read-ahead."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import weightlab.methods.merging.streaming as streaming
import weightlab.methods.merging.workers as workers_module
from weightlab import merging
from weightlab.errors import FormatError, WeightlabError
from weightlab.methods.merging.checkpoints import open_all
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.streaming import combine, merge_checkpoints
from weightlab.methods.merging.vector_stream import VectorStream
from weightlab.methods.merging.workers import ColumnWorkers
from weightlab.weights import merge_ops
from weightlab.weights.stream_io import SafetensorsReader, _read_fully

SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan, 1.0, -1.0]


@st.composite
def rows(draw: st.DrawFn) -> torch.Tensor:
    """(T, n) float32 with many ties, and sometimes zeros, subnormals, huge values, ±inf and NaN."""
    t, n = draw(st.integers(1, 3)), draw(st.integers(1, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(t, n, generator=gen)
    if draw(st.booleans()):  # ties: a few distinct values only
        x = torch.round(x * 2) / 2
    for _ in range(draw(st.integers(0, 6))):
        x[draw(st.integers(0, t - 1)), draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
    return x


def reference_kth(x: torch.Tensor, rank: int) -> tuple[float, float]:
    """The rank-th smallest |x| of a row by kthvalue and by topk (NaN sorts above inf in both)."""
    a = x.abs()
    return a.kthvalue(rank).values.item(), torch.topk(a, a.numel() - rank + 1).values[-1].item()


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=80, deadline=None)
@given(rows(), st.floats(0.0, 1.0), st.sampled_from([37, 1 << 20]))
def test_radix_select_equals_kthvalue_and_topk(x: torch.Tensor, fraction: float, chunk: int) -> None:
    ranks = [max(1, math.ceil(fraction * x.shape[1]))] * x.shape[0]
    high = merge_ops.radix_counts(x, chunk=chunk)
    got = merge_ops.select_from_counts(high, ranks, lambda bins: merge_ops.radix_counts(x, bins, chunk=chunk))
    whole = merge_ops.kth_smallest_magnitude(x, ranks)  # (one chunk per row)
    assert all(same_float(a, b) for a, b in zip(got.tolist(), whole.tolist(), strict=True))
    for t, rank in enumerate(ranks):
        kth, top = reference_kth(x[t], rank)
        assert same_float(got[t].item(), kth) and same_float(got[t].item(), top), (t, rank, got[t], kth)


@settings(max_examples=80, deadline=None)
@given(rows(), st.floats(0.01, 1.0))
def test_trim_thresholds_float32_equals_the_kthvalue_path(x: torch.Tensor, density: float) -> None:
    got = merge_ops.trim_thresholds(x, density)
    expected = merge_ops.trim_thresholds(x.double(), density).float()  # float64 takes kthvalue
    assert got.dtype == torch.float32
    for a, b in zip(got.tolist(), expected.tolist(), strict=True):
        assert same_float(a, b)


def test_radix_counts_are_additive_over_column_blocks() -> None:
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    whole = merge_ops.radix_counts(x)
    assert torch.equal(merge_ops.radix_counts(x[:, :300]) + merge_ops.radix_counts(x[:, 300:]), whole)
    assert int(whole.sum()) == 3000
    bins = [int(b) for b in whole.argmax(dim=1)]
    low = merge_ops.radix_counts(x, bins)
    assert torch.equal(low.sum(dim=1), whole[torch.arange(3), bins])  # every entry of the bin, none other


@settings(max_examples=100, deadline=None)
@given(rows(), st.floats(0.01, 1.0))
def test_trim_into_equals_trim_on_finite_input(x: torch.Tensor, density: float) -> None:
    x = torch.nan_to_num(x, nan=0.5, posinf=2.0, neginf=-2.0)
    thresholds = merge_ops.trim_thresholds(x, density)
    got = merge_ops.trim_into(torch.empty_like(x), x, merge_ops.shrink_lambdas(thresholds))
    assert torch.equal(got, merge_ops.trim(x, thresholds))
    assert torch.equal(merge_ops.trim_into(torch.empty_like(x), x, merge_ops.shrink_lambdas(torch.zeros(len(x)))), x)


def cancelling(t: int, n: int, seed: int) -> torch.Tensor:
    """Small integers: many entries whose task sum is exactly 0 although tasks touch them."""
    return torch.randint(-2, 3, (t, n), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("majority", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_fused_disjoint_merge_equals_the_reference(majority: float, reduce: str) -> None:
    x = cancelling(5, 2000, 1)
    assert bool(((x.sum(0) == 0) & (x != 0).any(0)).any())  # the data has exact cancellations
    expected = merge_ops.disjoint_merge(x, merge_ops.elect_sign(x, majority), reduce)
    got = merge_ops.disjoint_merge_(x.clone(), merge_ops.effective_sign(x.sum(0), majority), reduce)
    assert torch.equal(got, expected)


def test_apply_delta_in_place_equals_the_new_tensor() -> None:
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base, vector = torch.randn(50, generator=gen).to(dtype), torch.randn(50, generator=gen)
        expected = merge_ops.apply_delta(base, vector, 0.3)
        got = merge_ops.apply_delta(base, vector.clone(), 0.3, out=vector)
        assert got.dtype == dtype and torch.equal(got, expected)


# ------------------------------------------------------------------ combine on workers, every method/scope


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> ColumnWorkers:
    """Tiny chunks and blocks, so that a few hundred columns exercise every boundary; two worker threads."""
    monkeypatch.setattr(streaming, "CHUNK", 7)
    monkeypatch.setattr(workers_module, "MIN_BLOCK", 16)
    with ColumnWorkers(2) as pool:
        yield pool


def state_dict_merge(taus: list[dict], config: MergeConfig, lambdas: list[float]) -> dict:
    if config.method == "task-arithmetic":
        return merging.task_arithmetic(taus)
    if config.method == "ties":
        return merging.ties_merge(taus, density=config.density, reduce="mean", scope=config.scope)
    tau = (merging.task_arithmetic(taus) if config.method == "consensus-ta"
           else merging.ties_merge(taus, density=config.density, reduce="sum", scope=config.scope))
    return merging.masked(tau, merging.consensus_mask(merging.tall_masks(taus, tau, lambdas), config.k))


METHOD_SCOPES = [("task-arithmetic", "tensor"), ("ties", "tensor"), ("ties", "global"), ("consensus-ta", "tensor"),
                 ("consensus-ties", "tensor"), ("consensus-ties", "global")]


@pytest.mark.parametrize(("method", "scope"), METHOD_SCOPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_combine_on_workers_equals_state_dict_functions(small_blocks, method: str, scope: str, sign: float) -> None:
    """Exact cancellations with a negative or positive majority: the entries merged again after the pass."""
    x = cancelling(4, 500, 3)
    x = x + sign * (x == 0) * (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.3)
    taus = [{"w": x[t].reshape(20, 25)} for t in range(4)]
    config = MergeConfig(method=method, density=0.6, scope=scope, k=2)
    lambdas = [0.3, 0.4, 0.5, 0.6]
    expected = state_dict_merge(taus, config, lambdas)["w"].reshape(-1)
    options = {}
    if config.uses_ties and scope == "global":  # what the global passes compute over the whole model
        thresholds = merge_ops.trim_thresholds(x, config.density)
        options = {"thresholds": thresholds,
                   "majority": merge_ops.majority_sign(merge_ops.raw_sign(merge_ops.trim(x, thresholds)))}
    got = combine(x, config, lambdas=lambdas if method.startswith("consensus") else (), workers=small_blocks,
                  **options)
    assert torch.equal(got, expected)
    serial = combine(x, config, lambdas=lambdas if method.startswith("consensus") else (), **options)
    assert torch.equal(serial, expected)


def test_column_workers_cover_the_columns_and_keep_the_callers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(workers_module, "MIN_BLOCK", 3)
    with ColumnWorkers(3) as pool:
        assert torch.get_num_threads() == before
        blocks = pool.blocks(10)
        assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 10)]
        seen = pool.map(lambda b: (b.start, torch.get_num_threads(), threading.current_thread().name), 10)
        assert [s[0] for s in seen] == [0, 3, 6]
        assert all(s[1] == 1 and s[2].startswith("weightlab-merge") for s in seen)  # single-threaded workers
        assert len(pool.blocks(5)) == 1  # below MIN_BLOCK per worker: not split
        finished = []

        def fail_first(b: slice) -> int:
            if b.start == 0:
                raise ValueError("block 0")
            finished.append(b.start)
            return b.start

        with pytest.raises(ValueError, match="block 0"):
            pool.map(fail_first, 10)
        assert sorted(finished) == [3, 6]  # the others ran to the end before the error came out
        with pool.serial_caller():  # the caller's own operations are single-threaded while it merges
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before
    with ColumnWorkers(1) as inline, inline.serial_caller():  # one worker runs inline, with torch's threads
        assert torch.get_num_threads() == before


# --------------------------------------------------------------------------- reading: arena and read-ahead

SIZES = {"a": (40, 10), "b": (3,), "c": (50, 10), "d": (45, 10), "e": (7,), "f": (0,), "g": (12, 10)}


def write_models(root: Path, n_tasks: int = 3, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=gen) for k, s in SIZES.items()}
    paths = []
    for i in range(n_tasks + 1):
        state = base if i == 0 else {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        path = root / ("base.safetensors" if i == 0 else f"ft{i}.safetensors")
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
        paths.append(path)
    return paths[0], paths[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vector_stream_yields_every_key_exactly_with_and_without_read_ahead(tmp_path: Path, dtype: torch.dtype) -> None:
    base_path, ft_paths = write_models(tmp_path, dtype=dtype)
    base, fts = open_all(base_path, ft_paths)
    keys = list(SIZES)
    states = [load_file(str(p)) for p in [base_path, *ft_paths]]
    try:
        for ahead in (True, False):
            with VectorStream(base, fts, keys, read_ahead=ahead) as stream:
                # the arena: the largest key plus 25% of it, so c+d (side by side) does not fit and is read late
                assert stream.capacity == 4 * int(500 * 1.25)
                for _ in range(2):  # a second pass starts again from the first key
                    got = [(item.key, item.theta0.clone(), item.vectors.clone()) for item in stream]
                    assert [g[0] for g in got] == keys
                    for key, theta0, vectors in got:
                        assert theta0.dtype == dtype and torch.equal(theta0, states[0][key])
                        base32 = states[0][key].reshape(-1).float()
                        for t in range(3):
                            assert torch.equal(vectors[t], states[t + 1][key].reshape(-1).float() - base32)
    finally:
        base.close()
        for ft in fts:
            ft.close()


def only_inputs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_a_file_truncated_during_the_merge_raises_format_error_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_path, ft_paths = write_models(tmp_path)
    before = only_inputs(tmp_path)
    original = streaming.combine
    victim = ft_paths[2]

    def truncating(*args, **kwargs):
        if victim.stat().st_size > 200:  # after the first key: cut the last file down to its header and 'a'
            reader = SafetensorsReader(victim)
            os.truncate(victim, reader._data + reader.tensors["a"].end)
        return original(*args, **kwargs)

    monkeypatch.setattr(streaming, "combine", truncating)
    with pytest.raises(FormatError, match=r"ft3.safetensors.*truncated"):
        merge_checkpoints(base_path, ft_paths, tmp_path / "out.safetensors", MergeConfig(method="ties", scope="tensor"))
    assert only_inputs(tmp_path) == before  # no output, no temporary, no lock


def test_non_finite_values_in_a_later_key_raise_and_leave_no_output(tmp_path: Path) -> None:
    base_path, ft_paths = write_models(tmp_path)
    state = load_file(str(ft_paths[1]))
    state["g"][3, 4] = math.nan
    save_file(state, str(ft_paths[1]))
    before = only_inputs(tmp_path)
    with pytest.raises(WeightlabError, match=r"ft2.safetensors.*1 NaN/Inf value.*'g'"):
        merge_checkpoints(base_path, ft_paths, tmp_path / "out.safetensors", MergeConfig(method="ties"))
    assert only_inputs(tmp_path) == before


def test_finite_values_whose_sum_overflows_are_accepted(tmp_path: Path) -> None:
    base = {"w": torch.zeros(4)}
    fts = [{"w": torch.full((4,), 3e38)}, {"w": torch.full((4,), -3e38)}]
    for name, state in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    out = merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                            tmp_path / "o.safetensors", MergeConfig(method="task-arithmetic", alpha=0.5))
    assert torch.equal(load_file(str(out))["w"], torch.zeros(4))


@pytest.mark.parametrize(("method", "scope"), METHOD_SCOPES)
def test_streamed_merge_equals_in_memory_with_small_chunks_and_blocks(small_blocks, tmp_path: Path, method: str,
                                                                      scope: str) -> None:
    base_path, ft_paths = write_models(tmp_path)
    base, fts = load_file(str(base_path)), [load_file(str(p)) for p in ft_paths]
    config = MergeConfig(method=method, scope=scope, density=0.3, alpha=0.8, lambdas=(0.4,))
    out = merge_checkpoints(base_path, ft_paths, tmp_path / "out.safetensors", config)
    taus = merging.task_vectors(base, fts)
    expected = merging.apply(base, state_dict_merge(taus, config, [0.4] * 3), config.alpha)
    got = load_file(str(out))
    assert list(got) == list(SIZES) or set(got) == set(SIZES)
    for key in SIZES:
        assert torch.equal(got[key], expected[key]), key


def test_read_into_checks_its_buffer_and_reads_large_tensors_in_pieces(tmp_path: Path) -> None:
    save_file({"w": torch.arange(6.0)}, str(tmp_path / "m.safetensors"))
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    try:
        assert torch.equal(reader.read_into("w", torch.empty(6)), torch.arange(6.0))
        for bad in (torch.empty(5), torch.empty(6, dtype=torch.float64), torch.empty(12)[::2]):
            with pytest.raises(WeightlabError, match="read_into"):
                reader.read_into("w", bad)
    finally:
        reader.close()
    data = bytes(range(10))
    view = memoryview(bytearray(10))

    def in_threes(part: memoryview, done: int) -> int:
        n = min(3, len(part))
        part[:n] = data[done : done + n]
        return n

    assert _read_fully(in_threes, view) == 10 and bytes(view) == data
    assert _read_fully(lambda part, done: 4 if done < 8 else 0, memoryview(bytearray(10))) == 8  # end of file
