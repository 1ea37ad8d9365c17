"""The streaming merge / compress / extract commands on tiny safetensors checkpoints (``tall-masks``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from weightlab import merging
from weightlab.cli import main
from weightlab.errors import WeightlabError
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.streaming import merge_checkpoints
from weightlab.weights.stream_io import SafetensorsReader

SHAPES = {
    "embed.weight": ((6, 5), torch.float32),
    "layer.0.weight": ((4, 6), torch.float16),
    "layer.0.bias": ((4,), torch.bfloat16),
    "norm.weight": ((6,), torch.float32),
    "position_ids": ((5,), torch.int64),
}
SHARDS = {
    "model-00001-of-00002.safetensors": ["embed.weight", "position_ids"],
    "model-00002-of-00002.safetensors": ["layer.0.weight", "layer.0.bias", "norm.weight"],
}


def make_states(n_tasks: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        k: (torch.arange(s[0]) if d == torch.int64 else torch.randn(*s, generator=gen).to(d))
        for k, (s, d) in SHAPES.items()
    }
    fts = []
    for _ in range(n_tasks):
        fts.append(
            {
                k: v
                if not v.is_floating_point()
                else (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                for k, v in base.items()
            }
        )
    return base, fts


def write_file(state: dict, path: Path) -> Path:
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def write_folder(state: dict, path: Path) -> Path:
    path.mkdir()
    for shard, keys in SHARDS.items():
        save_file({k: state[k] for k in keys}, str(path / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in SHARDS.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text('{"model_type": "tiny"}')
    return path


def load_folder(path: Path) -> dict:
    out = {}
    for shard in SHARDS:
        out.update(load_file(str(path / shard)))
    return out


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, list[Path], dict, list[dict]]:
    base, fts = make_states()
    paths = [write_file(ft, tmp_path / f"task{i}.safetensors") for i, ft in enumerate(fts)]
    return write_file(base, tmp_path / "base.safetensors"), paths, base, fts


def expected_merge(base: dict, fts: list[dict], config: MergeConfig) -> dict:
    taus = merging.task_vectors(base, fts)
    if config.method == "task-arithmetic":
        vector = merging.task_arithmetic(taus)
    elif config.method == "ties":
        vector = merging.ties_merge(taus, density=config.density, reduce="mean", scope=config.scope)
    else:
        tau = (
            merging.task_arithmetic(taus)
            if config.method == "consensus-ta"
            else merging.ties_merge(taus, density=config.density, reduce="sum", scope=config.scope)
        )
        vector = merging.masked(
            tau, merging.consensus_mask(merging.tall_masks(taus, tau, list(config.lambdas)), config.k)
        )
    return merging.apply(base, vector, config.alpha)


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected) or set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("task-arithmetic", "global"),
        ("ties", "global"),
        ("ties", "tensor"),
        ("consensus-ta", "global"),
        ("consensus-ties", "global"),
    ],
)
def test_cli_merge_equals_in_memory_functions(ckpts, tmp_path: Path, method: str, scope: str) -> None:
    base_path, ft_paths, base, fts = ckpts
    out = tmp_path / "merged.safetensors"
    args = [
        "merge",
        str(base_path),
        *map(str, ft_paths),
        "--method",
        method,
        "--alpha",
        "0.7",
        "--k",
        "2",
        "--density",
        "0.3",
        "--scope",
        scope,
        "--lam",
        "0.3,0.4,0.5",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    config = MergeConfig(method=method, alpha=0.7, k=2, density=0.3, scope=scope, lambdas=(0.3, 0.4, 0.5))
    assert_same(load_file(str(out)), expected_merge(base, fts, config))
    metadata = SafetensorsReader(out).metadata
    assert metadata["format"] == "pt" and set(metadata) == {"format", "merge_config"}
    assert yaml.safe_load(metadata["merge_config"])["merge_method"] == method  # the provenance of a file


def test_merge_of_sharded_hf_folder_keeps_layout(tmp_path: Path) -> None:
    base, fts = make_states()
    base_dir = write_folder(base, tmp_path / "base")
    ft_dirs = [write_folder(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    out = tmp_path / "merged"
    merge_checkpoints(base_dir, ft_dirs, out, MergeConfig(method="ties", alpha=0.5))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    assert out.stat().st_mode & 0o777 == base_dir.stat().st_mode & 0o777  # not the 0700 of a temporary folder
    assert (out / "model.safetensors.index.json").read_text() == (
        base_dir / "model.safetensors.index.json"
    ).read_text()
    assert_same(load_folder(out), expected_merge(base, fts, MergeConfig(method="ties", alpha=0.5)))


def test_compress_extract_round_trip_file_and_folder(tmp_path: Path) -> None:
    base, fts = make_states(seed=1)
    for layout, writer in (("file", write_file), ("folder", write_folder)):
        root = tmp_path / layout
        root.mkdir()
        suffix = ".safetensors" if layout == "file" else ""
        base_path = writer(base, root / f"base{suffix}")
        ft_paths = [
            writer(ft, root / f"{name}{suffix}") for name, ft in zip(["a", "b", "c"], fts, strict=True)
        ]
        store = root / "store"
        assert (
            main(
                [
                    "compress",
                    str(base_path),
                    *map(str, ft_paths),
                    "--out",
                    str(store),
                    "--lam",
                    "0.3",
                    "--merge",
                    "ties",
                    "--quiet",
                ]
            )
            == 0
        )
        manifest = merging.read_manifest(store)
        assert manifest["tasks"] == ["a", "b", "c"] and manifest["version"] == 2
        taus = merging.task_vectors(base, fts)
        tau = merging.ties_merge(taus, density=0.2, reduce="sum", scope="global")
        masks = merging.tall_masks(taus, tau, 0.3)
        for t, name in enumerate(["a", "b", "c"]):
            out = root / f"extracted-{name}{suffix}"
            assert main(["extract", str(store), "--task", name, "--out", str(out), "--quiet"]) == 0
            got = load_file(str(out)) if layout == "file" else load_folder(out)
            assert_same(got, merging.apply(base, tau, mask=masks[t]))
        bits = manifest["storage_bits"]
        n_float = sum(v.numel() for v in base.values() if v.is_floating_point())
        assert bits["tall_bits"] - bits["single_model_bits"] == n_float * 32 + 3 * n_float


def test_compress_with_task_arithmetic_matches_apply(ckpts, tmp_path: Path) -> None:
    base_path, ft_paths, base, fts = ckpts
    store = tmp_path / "store"
    merging.compress(base_path, ft_paths, store, merge="task-arithmetic", lambdas=(0.2, 0.4, 0.6),
                     names=["x", "y", "z"])
    taus = merging.task_vectors(base, fts)
    tau = merging.task_arithmetic(taus)
    masks = merging.tall_masks(taus, tau, [0.2, 0.4, 0.6])
    merging.extract(store, "z", tmp_path / "z.safetensors")
    assert_same(load_file(str(tmp_path / "z.safetensors")), merging.apply(base, tau, mask=masks[2]))


# ------------------------------------------------------------------------------------------ bad input


def run_failing(args: list[str], capsys: pytest.CaptureFixture[str], match: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, err
    return err


def leftovers(folder: Path, before: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - before


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda s: s.pop("norm.weight"),
            "does not match the base in 1 tensor(s) (first: 'norm.weight' missing",
        ),
        (
            lambda s: s.update({"norm.weight": torch.zeros(7)}),
            "'norm.weight' is float32 [7], base has float32 [6]",
        ),
        (lambda s: s.update({"embed.weight": torch.zeros(6, 5, dtype=torch.float16)}), "is float16 [6, 5]"),
        (lambda s: s.update({"extra": torch.zeros(1), "more": torch.zeros(1)}), "in 2 tensor(s)"),
        (lambda s: s["embed.weight"].__setitem__((0, 0), float("nan")), "NaN/Inf value(s) in 'embed.weight'"),
        (lambda s: s["norm.weight"].__setitem__(1, float("inf")), "NaN/Inf"),
    ],
)
def test_bad_checkpoints_exit_2_without_output(ckpts, tmp_path: Path, capsys, change, match: str) -> None:
    base_path, ft_paths, _, fts = ckpts
    bad = dict(fts[1])
    bad = {k: v.clone() for k, v in bad.items()}
    change(bad)
    write_file(bad, ft_paths[1])
    before = {p.name for p in tmp_path.iterdir()}
    for cmd in (["merge", "--method", "ties", "--alpha", "0.5"], ["compress"]):
        out = tmp_path / ("out.safetensors" if cmd[0] == "merge" else "store")
        run_failing(
            [cmd[0], str(base_path), *map(str, ft_paths), *cmd[1:], "--out", str(out), "--quiet"],
            capsys,
            match,
        )
        assert leftovers(tmp_path, before) == set()


def test_pickle_checkpoint_is_refused(ckpts, tmp_path: Path, capsys) -> None:
    base_path, ft_paths, _, _ = ckpts
    pickle = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(1)}, pickle)
    err = run_failing(
        [
            "merge",
            str(base_path),
            str(ft_paths[0]),
            str(pickle),
            "--alpha",
            "0.5",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        capsys,
        "pickle checkpoint",
    )
    assert "Convert it with" in err
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    run_failing(
        ["merge", str(base_path), str(ft_paths[0]), str(folder), "--out", str(tmp_path / "o2")],
        capsys,
        "pickle checkpoint",
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--alpha", "nan"], "alpha must be a finite number, got nan"),
        (["--alpha", "inf"], "alpha must be a finite number, got inf"),
        (["--density", "0"], "density must be in (0, 1], got 0.0"),
        (["--density", "2"], "density must be in (0, 1], got 2.0"),
        (["--k", "-1"], "k must be an integer ≥ 0, got -1"),
        (["--method", "consensus-ta", "--k", "4"], "k = 4 exceeds the 3 tasks"),
        (["--method", "dare"], "method must be one of"),
        (["--scope", "layer"], "scope must be one of"),
        (["--lam", "0.1,x"], "--lam expects numbers"),
        (["--method", "consensus-ta", "--lam", "0.1,0.2"], "one lambda or one per task (3), got 2"),
    ],
)
def test_bad_options_exit_2(ckpts, tmp_path: Path, capsys, options: list[str], match: str) -> None:
    base_path, ft_paths, _, _ = ckpts
    before = {p.name for p in tmp_path.iterdir()}
    run_failing(
        ["merge", str(base_path), *map(str, ft_paths), *options, "--out", str(tmp_path / "o.safetensors")],
        capsys,
        match,
    )
    assert leftovers(tmp_path, before) == set()


def test_too_few_models_existing_output_and_bad_store(ckpts, tmp_path: Path, capsys) -> None:
    base_path, ft_paths, _, _ = ckpts
    run_failing(
        ["merge", str(base_path), str(ft_paths[0]), "--out", str(tmp_path / "o.safetensors")],
        capsys,
        "at least two fine-tuned checkpoints, got 2 path(s)",
    )
    with pytest.raises(WeightlabError, match="at least 2 fine-tuned checkpoints"):
        merge_checkpoints(base_path, ft_paths[:1], tmp_path / "o.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_text("keep me")
    run_failing(
        ["merge", str(base_path), *map(str, ft_paths), "--out", str(existing)], capsys, "already exists"
    )
    assert existing.read_text() == "keep me"
    run_failing(
        [
            "merge",
            str(base_path),
            str(tmp_path / "nope.safetensors"),
            *map(str, ft_paths),
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        capsys,
        "does not exist",
    )
    run_failing(
        ["extract", str(tmp_path), "--task", "a", "--out", str(tmp_path / "x")],
        capsys,
        "is not a weightlab compression store",
    )
    store = tmp_path / "store"
    merging.compress(base_path, ft_paths, store)
    run_failing(
        ["extract", str(store), "--task", "nope", "--out", str(tmp_path / "x")],
        capsys,
        "task 'nope' is not in the store; it holds task0, task1, task2",
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x05\x00")
    run_failing(
        ["merge", str(base_path), str(corrupt), *map(str, ft_paths), "--out", str(tmp_path / "o")],
        capsys,
        "not a readable safetensors file",
    )
