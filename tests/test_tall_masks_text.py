"""The text variant of ``tall-masks``: its tasks (SpamAssassin views, generated sentences) and a seeded run."""

from __future__ import annotations

import collections

import pytest

from weightlab.errors import WeightlabError
from weightlab.experiments import _merge_text_tasks as tasks

RAW = ("Return-Path: <a@b.c>\nReceived: from x\n\tby y\nFrom: Ann <ann@example.com>\nSubject: Cheap meds NOW\n"
       "X-Mailer: Foo 1.0\nContent-Type: text/plain\n\nHello there,\nbuy now.")


def test_email_views_split_the_headers_from_the_subject_and_body() -> None:
    assert tasks.subject_text(RAW) == "Cheap meds NOW"
    assert tasks.headers_text(RAW) == "From: Ann <ann@example.com>\nX-Mailer: Foo 1.0\nContent-Type: text/plain"
    assert tasks.EMAIL_VIEWS["spam"](RAW) == "Subject: Cheap meds NOW\nHello there,\nbuy now."
    assert tasks.subject_text("From: x\n\nbody") == ""


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_generated_tasks_are_fixed_distinct_and_use_every_class(name) -> None:
    pool, pool_y, test, test_y = tasks.generated(name, 750, 500)
    again = tasks.generated(name, 750, 500)
    assert (pool, test) == (again[0], again[2]) and pool_y.tolist() == again[1].tolist()
    assert len(set(pool)) == 750 and len(set(test)) == 500 and not set(pool) & set(test)
    counts = collections.Counter(pool_y.tolist() + test_y.tolist())
    k = tasks.classes(name)
    assert sorted(counts) == list(range(k)) and min(counts.values()) > 0.5 * 1250 / k  # roughly balanced


def test_generated_labels_follow_the_rules() -> None:
    texts, y, _, _ = tasks.generated("counts", 200, 1)
    for t, label in zip(texts, y.tolist(), strict=True):
        a, b = (tasks.WORDS.index(w) for w in t.split() if w in tasks.WORDS)
        assert label == int(a > b), t
    texts, y, _, _ = tasks.generated("sentiment", 300, 1)
    lookup = dict(zip(texts, y.tolist(), strict=True))
    simple = {t: v for t, v in lookup.items() if " but " not in t and not any(f" {n} " in f" {t} "
                                                                              for n in tasks.NEGATORS)}
    assert simple and all(v == int(t.split()[-1] in tasks.GOOD) for t, v in simple.items())
    texts, y, _, _ = tasks.generated("tense", 400, 1)
    assert all(label == 2 for t, label in zip(texts, y.tolist(), strict=True) if " will " in t)
    assert all(" will " in t for t, label in zip(texts, y.tolist(), strict=True) if label == 2)


def test_tense_has_the_past_present_homographs_and_number_the_invariant_plurals() -> None:
    """The irreducible ambiguity that keeps the fine-tuned models below 100%: "they put …" is past or
    present, "the sheep near …" singular or plural."""
    past_present = {v[0] for v in tasks.VERBS if v[0] == v[2]}
    assert {"put", "read"} <= past_present
    assert {n for n, p in tasks.NUMBER_NOUNS if n == p} >= {"sheep", "deer"}


def test_unknown_task_and_too_many_sentences_are_one_line_errors() -> None:
    with pytest.raises(WeightlabError, match="unknown text task 'poetry'"):
        tasks.task_texts("poetry", 10, 10)
    with pytest.raises(WeightlabError, match="text task 'question' has only"):
        tasks.generated("question", 5000, 5000)


def test_config_checks() -> None:
    from weightlab.experiments.tall_masks_text import TallMasksTextConfig

    with pytest.raises(WeightlabError, match="blocks must be in"):
        TallMasksTextConfig(blocks=7)
    with pytest.raises(WeightlabError, match="at least 2 distinct tasks"):
        TallMasksTextConfig(tasks=("spam", "spam"))
    with pytest.raises(WeightlabError, match="'poetry' is not one of"):
        TallMasksTextConfig(tasks=("spam", "poetry"))


def test_cached_lower_layers_and_the_fine_tuned_top_give_the_full_encoders_embedding() -> None:
    """Frozen layers cached + the top layer(s) run on them = all-MiniLM-L6-v2's own mean-pooled embedding."""
    import torch

    from weightlab.experiments import _lift_text as text
    from weightlab.experiments.tall_masks_text import LAYERS, _encoder

    encoder, tokenizer = _encoder("all-minilm-l6-v2")
    sentences = ["the movie was not great", "there are seven apples and twelve pears", "is the hotel lovely"]
    enc = tokenizer(sentences, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state  # (3, 16, 384)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    for blocks in (1, 2):
        feats = text.encode_features(encoder, tokenizer, sentences, max_length=16, frozen=LAYERS - blocks)
        got = text.embed(text.top_encoder(encoder, blocks), feats)
        assert torch.allclose(got, expected, atol=1e-5)


def test_seeded_text_run_is_reproducible_and_reports_every_method() -> None:
    from weightlab.experiments._tall_masks_report import METHODS
    from weightlab.experiments.tall_masks_text import TallMasksTextConfig, trial

    config = TallMasksTextConfig(tasks=("sentiment", "question"), n_train=32, n_val=16, n_test=24,
                                 sentence_length=12, steps=4, batch_size=16, seeds=1)
    first, second = trial(config, 0, None), trial(config, 0, None)
    assert first["acc"] == second["acc"] and first["chosen"] == second["chosen"]
    assert set(METHODS) <= set(first["acc"]) and all(len(v) == 2 for v in first["acc"].values())
    d = first["diagnostics"]
    assert all(0 < r < 0.1 for r in d["tau_rel_norm"])  # a brief fine-tune: small task vectors
    assert [round(d["cosine"][i][i], 6) for i in range(2)] == [1.0, 1.0]
    assert [row["n_test"] for row in first["training"]] == [24, 24] and first["tasks"] == ["sentiment", "question"]
    other = trial(config, 1, None)  # another seed: another split and fine-tune, the same fixed test sentences
    assert other["acc"] != first["acc"]
