"""The real-model pieces of experiment ``lift`` (paper key ``lift``): MiniLM-L6 on SpamAssassin.

The encoder's lower layers stay frozen, so their output is computed once per text and cached
(:func:`encode_features`); only the last ``blocks`` BERT layers and a linear head are fine-tuned
(:class:`TopClassifier`). The model's *source* abilities are measured on generated, general-domain sentence
pairs (:func:`paraphrase_pairs`): how closely its sentence embeddings still agree with the original model's
(cosine), and paraphrase retrieval — each sentence's nearest neighbour among the other phrasings should be
its own paraphrase — which is what a sentence-embedding model was trained for.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
from torch import Tensor, nn

# Synonym sets: a "meaning" picks one set from each slot; its two phrasings pick different members.
SUBJECTS = (("chef", "cook"), ("doctor", "physician"), ("child", "kid"), ("teacher", "instructor"),
            ("farmer", "grower"), ("pilot", "aviator"), ("lawyer", "attorney"), ("student", "pupil"),
            ("officer", "policeman"), ("singer", "vocalist"), ("boss", "manager"), ("sailor", "seaman"))
VERBS = (("bought", "purchased"), ("fixed", "repaired"), ("found", "discovered"), ("cleaned", "washed"),
         ("painted", "coloured"), ("sold", "traded"), ("lost", "misplaced"), ("carried", "hauled"),
         ("threw away", "discarded"), ("borrowed", "took on loan"), ("hid", "concealed"), ("wanted", "desired"))
OBJECTS = (("car", "automobile"), ("couch", "sofa"), ("present", "gift"), ("hat", "cap"),
           ("boat", "ship"), ("picture", "photo"), ("rock", "stone"), ("jacket", "coat"),
           ("bike", "bicycle"), ("bag", "sack"), ("house", "home"), ("road map", "street map"))
PLACES = (("near the river", "by the stream"), ("in the city", "downtown"), ("at dawn", "at sunrise"),
          ("yesterday", "the day before"), ("quickly", "fast"), ("at the shop", "in the store"),
          ("last winter", "during the previous winter"), ("on the hill", "on the slope"))


def paraphrase_pairs(n: int, *, seed: int) -> tuple[list[str], list[str]]:
    """``n`` distinct meanings, each phrased twice with different synonyms: ``(first phrasings, second)``."""
    rng = random.Random(seed)
    slots = (SUBJECTS, VERBS, OBJECTS, PLACES)
    total = 1
    for s in slots:
        total *= len(s)
    picks = rng.sample(range(total), n)
    first, second = [], []
    for code in picks:
        sets = []
        for s in slots:
            code, i = divmod(code, len(s))
            sets.append(s[i])
        order = [rng.randrange(2) for _ in sets]
        a = [syn[o] for syn, o in zip(sets, order)]
        b = [syn[1 - o] for syn, o in zip(sets, order)]
        first.append(f"the {a[0]} {a[1]} the {a[2]} {a[3]}")
        second.append(f"the {b[0]} {b[1]} the {b[2]} {b[3]}")
    return first, second


def email_text(raw: str) -> str:
    """The ``Subject:`` line and the body of a raw e-mail (the routing headers dropped)."""
    head, _, body = raw.partition("\n\n")
    subject = next((line for line in head.splitlines() if line.lower().startswith("subject:")), "")
    return f"{subject}\n{body}".strip()


def _attention_bias(mask: Tensor) -> Tensor:  # (B, L) 1 = token -> (B, 1, 1, L) additive
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


@torch.no_grad()
def encode_features(encoder: nn.Module, tokenizer: Any, texts: list[str], *, max_length: int, frozen: int,
                    batch_size: int = 64) -> Tensor:
    """The output of the encoder's first ``frozen`` layers for every text, packed with the attention mask as
    ``(N, L, D + 1)`` (the last channel is the mask) so the training loop batches one tensor."""
    encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding="max_length", max_length=max_length,
                        truncation=True, return_tensors="pt")
        h = encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        bias = _attention_bias(enc["attention_mask"])
        for layer in encoder.encoder.layer[:frozen]:
            h = _layer(layer, h, bias)
        out.append(torch.cat([h, enc["attention_mask"].unsqueeze(-1).to(h.dtype)], dim=-1))
    return torch.cat(out)  # (N, L, D + 1)


def _layer(layer: nn.Module, h: Tensor, bias: Tensor) -> Tensor:
    out = layer(h, attention_mask=bias)
    return out[0] if isinstance(out, tuple) else out


class TopEncoder(nn.Module):
    """The last BERT layers of a sentence encoder and its mean pooling: ``(B, L, D + 1)`` packed features →
    ``(B, D)`` L2-normalised sentence embeddings (as sentence-transformers' all-MiniLM-L6-v2 pools)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D + 1) -> (B, D)
        h, mask = x[..., :-1], x[..., -1]  # (B, L, D), (B, L)
        bias = _attention_bias(mask)
        for layer in self.layer:
            h = _layer(layer, h, bias)
        m = mask.unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        return nn.functional.normalize(pooled, dim=-1)


class TopClassifier(nn.Module):
    """:class:`TopEncoder` and a linear ``classifier`` on its embedding."""

    def __init__(self, top: TopEncoder, classes: int) -> None:
        super().__init__()
        self.top = top
        dim = top.layer[0].attention.self.query.in_features
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D + 1) -> (B, classes)
        return self.classifier(self.top(x))


def top_encoder(encoder: nn.Module, blocks: int) -> TopEncoder:
    """A copy of the encoder's last ``blocks`` layers as a :class:`TopEncoder`."""
    return TopEncoder([copy.deepcopy(m) for m in encoder.encoder.layer[-blocks:]])


@torch.no_grad()
def embed(top: TopEncoder, features: Tensor, *, batch_size: int = 256) -> Tensor:
    """Sentence embeddings ``(N, D)`` of packed features ``(N, L, D + 1)``."""
    top.eval()
    return torch.cat([top(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])


def retrieval_accuracy(first: Tensor, second: Tensor) -> float:
    """Fraction of rows of ``first`` ``(N, D)`` whose most cosine-similar row of ``second`` ``(N, D)`` is the
    same row (unit-norm embeddings), averaged over both directions."""
    sim = first @ second.T  # (N, N)
    target = torch.arange(len(first))
    return 0.5 * ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()).item()


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity of two unit-norm embedding matrices ``(N, D)``."""
    return (a * b).sum(-1).mean().item()


def fit_probe(head: nn.Linear, emb: Tensor, y: Tensor, *, steps: int = 100, lr: float = 0.5) -> None:
    """Fit ``head`` as a logistic-regression probe on frozen embeddings ``(N, D)`` (full-batch Adam)."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(head(emb), y).backward()
        opt.step()


def relative_update(before: dict[str, Tensor], after: nn.Module) -> float:
    """``‖ΔW‖_F / ‖W‖_F`` over the weights named in ``before`` (``{name: original weight}``)."""
    now = dict(after.named_parameters())
    num = sum(((now[n].detach() - w) ** 2).sum() for n, w in before.items())
    den = sum((w ** 2).sum() for w in before.values())
    return float((num / den).sqrt())


def top_energy(weight: Tensor, rank: int) -> float:
    """Fraction of ``‖W‖_F²`` held by the ``rank`` largest singular values."""
    s = torch.linalg.svdvals(weight.detach().float())
    return float((s[:rank] ** 2).sum() / (s ** 2).sum())
