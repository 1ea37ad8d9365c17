"""One conformance suite over every registered merge method (DESIGN.md, Tests)."""

import pytest
import torch

from weightlab import merging, registry


def _checkpoints(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(6, generator=gen)}
    finetuned = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    return base, finetuned


@pytest.mark.parametrize("name", registry.names("merge"))
def test_merge_method_conforms(name):
    method = registry.get("merge", name)
    base, finetuned = _checkpoints()
    vectors = merging.task_vectors(base, finetuned)
    copies = [{k: v.clone() for k, v in tv.items()} for tv in vectors]
    merged = method(vectors)
    for tv, copy in zip(vectors, copies):  # inputs unchanged
        assert all(torch.equal(tv[k], copy[k]) for k in tv)
    assert set(merged) == set(base) and all(merged[k].shape == base[k].shape for k in base)
    assert all(torch.isfinite(v).all() for v in merged.values())
    again = method(vectors)
    assert all(torch.equal(merged[k], again[k]) for k in merged)  # deterministic
    at_zero = merging.apply(base, merged, alpha=0.0)
    assert all(torch.equal(at_zero[k], base[k]) for k in base)  # identity at zero strength
    assert any(not torch.equal(merging.apply(base, merged, alpha=1.0)[k], base[k]) for k in base)


def test_registry_lists_the_paper_baselines():
    assert {"task-arithmetic", "weight-averaging", "ties", "consensus-ta", "consensus-ties"} <= set(
        registry.names("merge"))
