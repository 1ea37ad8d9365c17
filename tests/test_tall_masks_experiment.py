"""The ``tall-masks`` experiment: its real-image tasks, the diagnostics' formulas, and a seeded end-to-end run
on the pretrained EfficientNet-Lite0 at tiny scale."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from weightlab import merging
from weightlab.data import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.experiments._merge_tasks import (
    IMAGE_TASKS,
    TASKS_8,
    TASKS_14,
    TaskNet,
    cached_features,
    centroid_head,
    split_lite0,
    tail_state,
    task_images,
    task_labels,
)
from weightlab.experiments._tall_masks_report import binomial_se, normalized
from weightlab.experiments.tall_masks import TallMasksExpConfig, Task, finetune, run_seed, vector_diagnostics

TINY = dict(data="digits", tasks=("digits", "digits-inverted"), image_size=32, n_train=60, n_val=40, n_test=50,
            steps=12, batch_size=32)


def test_vector_diagnostics_known_answer() -> None:
    theta0 = {"w": torch.tensor([3.0, 4.0])}
    taus = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}]
    d = vector_diagnostics(theta0, taus)
    assert d["tau_rel_norm"] == pytest.approx([0.2, 0.4, math.sqrt(2) / 5])
    assert d["tau_changed"] == pytest.approx([0.5, 0.5, 1.0])
    s = 1 / math.sqrt(2)
    assert np.allclose(d["cosine"], [[1, 0, s], [0, 1, s], [s, s, 1]])


def test_binomial_standard_error_of_a_task_mean() -> None:
    record = {"acc": {"m": [0.5, 0.9]}, "training": [{"n_test": 100}, {"n_test": 400}]}
    assert binomial_se(record, "m") == pytest.approx(math.sqrt(0.25 / 100 + 0.09 / 400) / 2)


def test_task_suites_and_label_groupings() -> None:
    assert len(TASKS_8) == 8 and len(TASKS_14) == 14 and len(set(TASKS_14)) == 14
    assert task_labels(IMAGE_TASKS["mnist-parity"], torch.arange(10)).tolist() == [0, 1] * 5
    assert task_labels(IMAGE_TASKS["fashion-groups"], torch.tensor([0, 5, 8, 9])).tolist() == [0, 2, 3, 2]
    assert {IMAGE_TASKS[t].classes for t in TASKS_8} == {10, 4, 2}
    fashion = [IMAGE_TASKS[t] for t in TASKS_14 if IMAGE_TASKS[t].source == "fashion-mnist"]
    assert len({t.chunk for t in fashion}) == len(fashion)  # disjoint chunks of Fashion-MNIST


def test_derived_tasks_transform_the_same_images() -> None:
    plain, plain_test = task_images(IMAGE_TASKS["digits"], n_pool=30, n_test=20)
    inverted, _ = task_images(IMAGE_TASKS["digits-inverted"], n_pool=30, n_test=20)
    rotated, _ = task_images(IMAGE_TASKS["digits-rotated"], n_pool=30, n_test=20)
    assert plain.x.shape == (30, 1, 28, 28) and len(plain_test) == 20
    assert torch.allclose(inverted.x, 1 - plain.x) and torch.equal(inverted.y, plain.y)
    assert torch.allclose(rotated.x, torch.rot90(plain.x, 1, dims=(-2, -1)))
    with pytest.raises(WeightlabError, match="fewer than n_test"):
        task_images(IMAGE_TASKS["digits"], n_pool=30, n_test=1001)


def test_features_are_cached_once_per_image_set(tmp_path, monkeypatch) -> None:
    from weightlab.models import pretrained

    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))
    trunk, _ = split_lite0(pretrained("efficientnet_lite0"))
    sizes = dict(image_size=32, n_pool=12, n_test=8)
    first = cached_features(IMAGE_TASKS["digits"], trunk, **sizes)
    files = list((tmp_path / "features").glob("*.safetensors"))
    again = cached_features(IMAGE_TASKS["digits"], torch.nn.Identity(), **sizes)  # read back, no trunk run
    assert len(files) == 1 and first["pool_x"].shape == (12, 192, 1, 1)
    assert torch.equal(first["pool_x"], again["pool_x"]) and torch.equal(first["test_y"], again["test_y"])
    cached_features(IMAGE_TASKS["digits-inverted"], trunk, **sizes)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2


def test_config_refuses_non_digits_tasks_with_digits_data() -> None:
    with pytest.raises(WeightlabError, match="data=digits runs only the digits tasks"):
        TallMasksExpConfig(data="digits", tasks=("digits", "mnist"))
    with pytest.raises(WeightlabError, match="at least 2 distinct tasks"):
        TallMasksExpConfig(tasks=("mnist", "mnist"))


def test_fine_tuning_keeps_the_pretrained_batchnorm_statistics(tmp_path, monkeypatch) -> None:
    from weightlab.models import pretrained

    monkeypatch.setenv("WEIGHTLAB_CACHE", str(tmp_path))
    trunk, tail = split_lite0(pretrained("efficientnet_lite0"))
    theta0, stats = tail_state(tail), {k: v.clone() for k, v in tail.state_dict().items() if "running" in k}
    feats = cached_features(IMAGE_TASKS["digits"], trunk, image_size=32, n_pool=40, n_test=4)
    data = ArrayDataset(feats["pool_x"], feats["pool_y"] % 2)
    net = TaskNet(tail, centroid_head(tail, data.x, data.y, 2), 20.0)
    config = dataclasses.replace(TallMasksExpConfig(), steps=3, batch_size=8)
    state, record = finetune(net, theta0, Task("t", 2, data, data, data), config, seed=0)
    assert not net.train().training and len(record["epoch_losses"]) == 1
    assert all(torch.equal(v, tail.state_dict()[k]) for k, v in stats.items())  # BatchNorm statistics frozen
    assert set(state) == set(theta0) and any(not torch.equal(state[k], theta0[k]) for k in state)


def test_seeded_run_fine_tunes_small_task_vectors_and_reports_the_diagnostics() -> None:
    config = dataclasses.replace(TallMasksExpConfig(), **TINY)
    record = run_seed(config, seed=0)
    d, T = record["diagnostics"], 2
    for row in record["training"]:  # fine-tuning lowers the training loss on frozen heads
        assert row["epoch_losses"][-1] < row["epoch_losses"][0]
        assert row["n_train"] + row["n_val"] == 100 and abs(row["n_val"] - 40) <= 2 and row["n_test"] == 50
    assert all(0 < r < 0.05 for r in d["tau_rel_norm"])  # a brief, low-lr fine-tune: small task vectors
    assert np.allclose(np.diag(d["cosine"]), 1) and np.allclose(d["cosine"], np.transpose(d["cosine"]))
    assert sum(record["agreement"]) == record["params"] == 1_017_600 and len(record["agreement"]) == T + 1
    assert record["chosen"]["alpha task arithmetic"] in merging.ALPHA_GRID
    assert all(lam in merging.LAMBDA_GRID for lam in record["chosen"]["lambdas TA"])
    assert normalized(record, "fine-tuned") == 1.0
    assert min(record["acc"]["zero-shot"]) > 0.3  # the pretrained features and centroid heads beat chance (0.1)


@pytest.mark.slow
def test_minilm_merging_runs_on_a_hugging_face_transformer() -> None:
    from weightlab.experiments._tall_masks_minilm import minilm_check

    out = minilm_check(seed=0, steps=10)
    acc = {m.split(" (")[0]: float(np.mean(a)) for m, a in out["acc"].items()}
    assert out["params"] > 20_000_000
    assert acc["TALL mask + TA"] >= acc["zero-shot"]
    assert acc["fine-tuned"] >= acc["zero-shot"]
