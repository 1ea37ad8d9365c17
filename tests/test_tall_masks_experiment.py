"""End-to-end check of the ``tall-masks`` experiment's claim direction at tiny scale (seeded)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from weightlab.experiments.tall_masks import TallMasksExpConfig, run_seed

TINY = dict(
    n_tasks=3,
    hidden=64,
    pretrain_images=0,
    pretrain_epochs=2,
    probe_steps=10,
    finetune_epochs=2,
    k_ablation=(),
)


def normalized(result: dict, method: str) -> float:
    acc = result["acc"]
    return float(np.mean(np.asarray(acc[method]) / np.asarray(acc["fine-tuned"])))


def test_tall_masks_recover_the_fine_tuned_models_better_than_merging() -> None:
    result = run_seed(dataclasses.replace(TallMasksExpConfig(), **TINY), seed=0)
    tall, ta, zero = (normalized(result, m) for m in ("TALL mask + TA", "task arithmetic", "zero-shot"))
    assert tall > ta and tall > zero  # the direction of the paper's compression claim
    assert tall > 0.9
    assert len(result["agreement"]) == 4 and sum(result["agreement"]) == result["params"]
    assert all(0 < a <= 1.0 for a in result["acc"]["fine-tuned"])


@pytest.mark.slow
def test_minilm_merging_runs_on_a_hugging_face_transformer() -> None:
    from weightlab.experiments._tall_masks_minilm import minilm_check

    out = minilm_check(seed=0, steps=10)
    acc = {m.split(" (")[0]: float(np.mean(a)) for m, a in out["acc"].items()}
    assert out["params"] > 20_000_000
    assert acc["TALL mask + TA"] >= acc["zero-shot"]
    assert acc["fine-tuned"] >= acc["zero-shot"]
