"""One conformance suite over every registered merge method (DESIGN.md, Tests), in memory and streamed.

Every method of the table, with options that make it do something: inputs unchanged, the base's keys,
shapes and dtypes, finite, deterministic, the base back at zero strength; and the same tensors whether it
runs on state dicts in memory or streams checkpoints from disk (and, for the paper methods, whether the
streaming kernel or the generic executor runs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightlab import merging, registry
from weightlab.methods.merging import methods

CASES = [(name, "reference") for name in registry.names("merge")] + [("ties", "mergekit")]


def _checkpoints(n_models: int, seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen).half(),
            "n": torch.randn(4, generator=gen).bfloat16(), "steps": torch.arange(3)}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(n_models)]
    return base, fts


def _options(name: str, convention: str, n_models: int) -> dict:
    """Options of ``name`` that make it non-trivial (per-model values where the method reads them)."""
    reads = methods.get(name).reads
    options: dict = {"convention": convention} if name == "ties" else {}
    if "weights" in reads and not (name == "ties" and convention == "reference"):
        options["weights"] = (1.0, -0.5, 1.5)[:n_models]
    if "density" in reads:
        options["density"] = 0.5
    if name == "ties" and convention == "mergekit":
        options.update(densities=(0.5, 0.3, 0.8), scope="tensor")
    for option, value in (("k", 1), ("lam", (0.3, 0.4, 0.5)), ("t", 0.3), ("seed", 3), ("gamma", 0.1),
                          ("alpha", 1.3)):
        if option in reads:
            options["lambdas" if option == "lam" else option] = value
    return options


def _case(name: str, convention: str) -> tuple[dict, list[dict], dict]:
    n_models = methods.get(name).models[0] if methods.get(name).models[1] == 1 else 3
    base, fts = _checkpoints(n_models)
    return base, fts, _options(name, convention, n_models)


def test_every_method_is_registered_under_one_vocabulary() -> None:
    assert registry.names("merge") == sorted(methods.NAMES)
    assert {"task-arithmetic", "linear", "ties", "dare-ta", "dare-ties", "breadcrumbs", "breadcrumbs-ties", "slerp",
            "consensus-ta", "consensus-ties"} == set(methods.NAMES)
    assert merging.METHODS == methods.NAMES and registry.get("merge", "slerp") is methods.get("slerp")


@pytest.mark.parametrize(("name", "convention"), CASES)
def test_merge_method_conforms(name: str, convention: str) -> None:
    base, fts, options = _case(name, convention)
    copies = [{k: v.clone() for k, v in ft.items()} for ft in [base, *fts]]
    merged = merging.merge(base, fts, name, **options)
    for sd, copy in zip([base, *fts], copies):  # inputs unchanged
        assert all(torch.equal(sd[k], copy[k]) for k in sd)
    assert list(merged) == list(base)
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype for k in base)
    assert all(torch.isfinite(v.float()).all() for v in merged.values())
    assert torch.equal(merged["steps"], base["steps"]) and merged["steps"] is not base["steps"]
    again = merging.merge(base, fts, name, **options)
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # deterministic
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    strength = methods.get(name).strength
    if strength is not None:  # identity at zero strength
        at_zero = merging.merge(base, fts, name, **{**options, strength: 0.0})
        assert all(torch.equal(at_zero[k], base[k]) for k in base)
    else:  # linear: one model with all the weight is that model
        one = merging.merge(base, fts, name, **{**options, "weights": (0.0, 1.0, 0.0)})
        assert all(torch.equal(one[k], fts[1][k]) for k in base)


def _write(states: list[dict], folder: Path) -> list[Path]:
    paths = []
    for i, sd in enumerate(states):
        paths.append(folder / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]), metadata={"format": "pt"})
    return paths


@pytest.mark.parametrize(("name", "convention"), CASES)
def test_streamed_merge_equals_the_merge_in_memory(tmp_path: Path, name: str, convention: str) -> None:
    base, fts, options = _case(name, convention)
    base_path, *ft_paths = _write([base, *fts], tmp_path)
    expected = merging.merge(base, fts, name, **options)
    config = merging.MergeConfig(method=name, **options)
    runs = {"auto": None} | ({"kernel": True, "generic": False} if config.fits_kernel(len(fts)) else {})
    for run, kernel in runs.items():
        out = tmp_path / f"{run}.safetensors"
        merging.merge_checkpoints(base_path, ft_paths, out, config, kernel=kernel)
        got = load_file(str(out))
        assert set(got) == set(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (run, k)


def test_kernel_methods_are_the_paper_functions() -> None:
    """The table's paper methods give what the facade's functions over task vectors give."""
    base, fts = _checkpoints(3)
    taus = merging.task_vectors(base, fts)
    expected = {
        "task-arithmetic": merging.task_arithmetic(taus),
        "ties": merging.ties_merge(taus, density=0.5, reduce="mean"),
        "consensus-ta": merging.masked(t := merging.task_arithmetic(taus),
                                       merging.consensus_mask(merging.tall_masks(taus, t, 0.3), k=1)),
        "consensus-ties": merging.masked(s := merging.ties_merge(taus, density=0.5, reduce="sum"),
                                         merging.consensus_mask(merging.tall_masks(taus, s, 0.3), k=1)),
    }
    for name, vector in expected.items():
        got = merging.merge(base, fts, name, density=0.5, k=1, lambdas=(0.3,), alpha=0.7)
        want = merging.apply(base, vector, 0.7)
        assert all(torch.equal(got[k], want[k]) for k in base), name
