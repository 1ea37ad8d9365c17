"""Experiment ``lift`` on the real MiniLM-L6 and SpamAssassin: known answers of its measures, the cached-layer
model against the whole encoder, each method's budget on real weights, the smoke profile, CLI errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from weightlab.cli import main
from weightlab.experiments import _lift_text as text
from weightlab.experiments.base import run_experiment
from weightlab.experiments.lift import LiftExperimentConfig, fine_tune, load, matched, probe, split, targets
from weightlab.weights.lowrank import lora_budget, principal_weight_mask

SMALL = LiftExperimentConfig(n_train=32, n_val=16, n_test=32, n_source=16, max_length=12, source_length=10,
                             epochs=1, lrs=(1e-3,), lora_rank=2, filter_rank=2, refresh_every=0)


def test_paraphrase_pairs_phrase_distinct_meanings_twice_with_other_words() -> None:
    a, b = text.paraphrase_pairs(50, seed=3)
    assert len(set(a)) == 50 and all(x != y for x, y in zip(a, b))
    assert text.paraphrase_pairs(50, seed=3) == (a, b)
    # "the chef bought ..." and "the cook purchased ..." are the same meaning: the subject is a synonym
    subjects = {w: s for s in text.SUBJECTS for w in s}
    assert all(subjects[x.split()[1]] == subjects[y.split()[1]] for x, y in zip(a, b))


def test_retrieval_cosine_update_energy_and_email_known_answers() -> None:
    e = torch.eye(3)
    assert text.retrieval_accuracy(e, e) == 1.0
    assert text.retrieval_accuracy(e, e[[1, 0, 2]]) == pytest.approx(1 / 3)  # only row 2 finds its pair
    assert text.mean_cosine(e, e[[1, 0, 2]]) == pytest.approx(1 / 3)
    w = torch.diag(torch.tensor([3.0, 4.0]))  # singular values 4, 3: energies 16, 9 of 25
    assert text.top_energy(w, 1) == pytest.approx(16 / 25)
    lin = nn.Linear(2, 2, bias=False)
    lin.weight.data = w.clone()
    lin.weight.data[0, 0] = 6.0  # ΔW = 3 at one entry, ‖W‖ = 5
    assert text.relative_update({"weight": w}, lin) == pytest.approx(0.6)
    assert text.email_text("From: a@b\nSubject: hi\nX: y\n\nbody\n\nmore") == "Subject: hi\nbody\n\nmore"


def test_matched_level_is_the_lowest_best_and_each_method_keeps_its_most_faithful_row() -> None:
    grid = {"a": [{"lr": 1, "val": 0.90, "source_cos_val": 0.5}, {"lr": 2, "val": 0.86, "source_cos_val": 0.8},
                  {"lr": 3, "val": 0.70, "source_cos_val": 0.99}],
            "b": [{"lr": 1, "val": 0.85, "source_cos_val": 0.7}, {"lr": 2, "val": 0.60, "source_cos_val": 0.9}]}
    level, rows = matched(grid)
    assert level == 0.85 and rows["a"]["lr"] == 2 and rows["b"]["lr"] == 1


def test_cached_lower_layers_and_the_top_encoder_reproduce_minilm() -> None:
    from weightlab.models import pretrained
    from weightlab.models.pretrained import pretrained_tokenizer

    encoder, tok = pretrained("all-minilm-l6-v2"), pretrained_tokenizer("all-minilm-l6-v2")
    sentences = ["the cook repaired the sofa downtown", "Subject: cheap meds\nbuy now"]
    features = text.encode_features(encoder, tok, sentences, max_length=12, frozen=4)  # (2, 12, 385)
    enc = tok(sentences, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(**enc).last_hidden_state  # (2, 12, 384)
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(text.embed(text.top_encoder(encoder, 2), features), want, atol=1e-5, rtol=0)


def test_every_method_changes_what_its_budget_allows_on_the_real_weights() -> None:
    # seeded: full FT moves every entry of the fine-tuned layer; LIFT (no refresh) moves at most k entries of
    # each matrix, all inside the principal-weight mask of the pretrained matrix; LoRA's update has rank ≤ r
    data = load(SMALL)
    train_set, _ = split(SMALL, data, 0)
    head = probe(data, train_set, 0)
    deltas = {}
    for method in ("full", "lift", "lora"):
        model = text.TopClassifier(copy.deepcopy(data.top), 2)
        model.classifier.load_state_dict(head)
        before = targets(model)
        model, loss = fine_tune(SMALL, model, method, 1e-3, 0, train_set)
        assert loss > 0
        now = dict(model.named_parameters())
        deltas[method] = {n: now[n].detach() - w for n, w in before.items()}
    assert len(deltas["lift"]) == 6  # query, key, value and the three dense matrices of the layer
    for name, w in targets(text.TopClassifier(copy.deepcopy(data.top), 2)).items():
        k = lora_budget(tuple(w.shape), SMALL.lora_rank)
        assert (deltas["full"][name] != 0).float().mean() > 0.99
        moved = deltas["lift"][name].flatten().nonzero().flatten()
        assert 0 < len(moved) <= k
        assert torch.isin(moved, principal_weight_mask(w, SMALL.filter_rank, k)).all()
        assert torch.linalg.matrix_rank(deltas["lora"][name], atol=1e-6) <= SMALL.lora_rank


def test_smoke_profile_writes_the_tables_claims_and_pareto_plot(tmp_path) -> None:
    out, results = run_experiment("lift", profile="smoke", out=tmp_path / "run")
    best = next(iter(results.tables.values()))
    assert [r["method"] for r in best] == ["probe (no fine-tuning)", "full", "lift"]
    texts = [c.text for c in results.claims]
    assert any("full fine-tuning" in t for t in texts) and any("randomized" in t for t in texts)
    saved = json.loads((out / "results.json").read_text())
    matrices = saved["records"]["0"]["matrices"]
    assert {r["matrix"].rsplit(".", 1)[-1] for r in matrices} == {"query", "key", "value", "dense"}
    assert all(0 < r["mask overlap"] <= 1 and 0 < r["top-2 energy"] < 1 for r in matrices)
    assert (out / "plots" / "pareto.png").is_file()


def test_cli_rejects_bad_config_with_exit_status_2(tmp_path, capsys) -> None:
    smoke = ["run", "lift", "--profile", "smoke", "--out", str(tmp_path / "a"), "--set"]
    assert main([*smoke, "methods=lift,dora"]) == 2
    assert "methods: 'dora' is not one of full, lora" in capsys.readouterr().err
    assert main([*smoke, "blocks=7"]) == 2
    assert "blocks must be in [1, 6] (MiniLM-L6's layers), got 7" in capsys.readouterr().err
    assert main([*smoke, "methods=full"]) == 2
    assert "methods must include lift" in capsys.readouterr().err
