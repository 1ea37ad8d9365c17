"""The text tasks of ``tall-masks-text``: SpamAssassin and tasks derived from it or generated.

Three tasks read the SpamAssassin corpus (``load_dataset("spam-assassin")``, its fixed train/test split):
spam vs ham on the subject line and body (``spam``), on the subject line alone (``spam-subject``) and on the
header lines other than the subject and the routing lines (``spam-headers``: From, To, Date, X-Mailer,
Content-Type, …): one label, three domains of the same mails. The others are generated sentences with
ambiguity that the pretrained sentence embedding does not resolve by itself (negations and contrasts,
number comparisons, topics told apart by the object of a shared verb, questions without
question marks, tense from the verb form alone, grammatical number with an attractor noun). Generation is deterministic
(``random.Random`` seeded by the task name and ``DATA_SEED``); a task's training pool and test sentences are
distinct strings, so no test sentence is seen in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.experiments._lift_text import email_text
from weightlab.utils import derive_seed

DATA_SEED = 0  # the generated sentences and the e-mail subsets are fixed; a run's seed splits and trains
TextTaskName = Literal["spam", "spam-subject", "spam-headers", "sentiment", "counts", "topic", "question",
                       "number", "tense"]
TEXT_TASKS_8: tuple[TextTaskName, ...] = ("spam", "spam-subject", "spam-headers", "sentiment", "counts",
                                          "topic", "question", "number")
TEXT_TASKS_ALL: tuple[TextTaskName, ...] = (*TEXT_TASKS_8, "tense")
SPAM_TASKS = ("spam", "spam-subject", "spam-headers")
CLASSES = {"topic": 4, "tense": 3}  # the others have 2

NOUNS = ("movie", "meal", "hotel", "book", "concert", "phone", "trip", "game", "show", "class", "laptop",
         "museum", "album", "restaurant", "flight", "course")
GOOD = ("great", "wonderful", "excellent", "lovely", "fantastic", "superb", "pleasant", "brilliant", "fine")
BAD = ("awful", "terrible", "boring", "horrible", "dreadful", "poor", "disappointing", "dull", "bad")
NEGATORS = ("not", "never", "hardly", "far from", "not at all")
WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()
THINGS = ("apples", "pears", "plums", "lemons", "figs", "peaches", "cars", "boats", "chairs", "books",
          "dogs", "cats")
TOPIC_VERBS = ("ran", "took", "checked", "made", "lost", "watched", "set", "got")
TOPIC_OBJECTS = (  # sport, finance, health, travel: the verb is shared, the object decides
    ("the race", "a penalty", "the score", "a save", "the final", "the match", "a record time", "the trophy"),
    ("the fund", "a loan", "the balance", "a deposit", "the shares", "the market", "a budget", "the dividend"),
    ("a fever", "a pill", "the pulse", "an appointment", "some weight", "the diet", "a broken bone", "the flu"),
    ("a taxi", "the ferry", "the map", "a booking", "the luggage", "the sunset", "an early flight", "a visa"),
)
TOPIC_SHARED_OBJECTS = (  # objects of two topics: the label is either (an ambiguity no model resolves)
    ("a shot", (0, 2)), ("the record", (0, 1)), ("the ticket", (0, 3)), ("the check", (1, 2)),
    ("the exchange", (1, 3)), ("a transfer", (0, 3)), ("the pressure", (2, 0)), ("the connection", (3, 1)),
)
SHARED = ("after a record week", "under a lot of pressure", "with the club", "near the bank",
          "before the court hearing", "during the long run", "with a fresh balance", "despite the shot",
          "on a tight schedule", "after the check", "with a strong return", "before the big race")
SUBJECTS = ("she", "he", "the manager", "my friend", "the team", "our neighbour", "the doctor", "they")
Q_PAIRS = (  # (question without a question mark, the statement with the same words)
    ("is the {n} {a}", "the {n} is {a}"), ("was the {n} {a}", "the {n} was {a}"),
    ("can you fix the {n}", "you can fix the {n}"), ("did she like the {n}", "she did like the {n}"),
    ("where did he leave the {n}", "he left the {n} somewhere"), ("why is the {n} so {a}", "the {n} is so {a}"),
    ("should we buy the {n}", "we should buy the {n}"), ("has anyone seen the {n}", "someone has seen the {n}"),
    ("would the {n} be {a}", "the {n} would be {a}"), ("how {a} is the {n}", "how {a} the {n} is"),
)
VERBS = (  # (past, present after he/she, present after I/we/you/they, future); the last six: past = present
    ("went", "goes", "go"), ("ate", "eats", "eat"), ("wrote", "writes", "write"), ("bought", "buys", "buy"),
    ("saw", "sees", "see"), ("took", "takes", "take"), ("made", "makes", "make"), ("found", "finds", "find"),
    ("put", "puts", "put"), ("cut", "cuts", "cut"), ("hit", "hits", "hit"), ("set", "sets", "set"),
    ("read", "reads", "read"), ("shut", "shuts", "shut"))
SINGULAR, PLURAL = ("she", "he", "the manager", "my friend"), ("I", "we", "you", "they")
TENSE_TAILS = ("to the market", "a long letter", "the old bridge", "with her sister", "every detail",
               "at the station", "something strange", "in the morning", "quite often", "at home")
TENSE_TIMES = ("yesterday", "tomorrow", "next week", "last year", "right now", "")  # independent of the label
NUMBER_NOUNS = (("key", "keys"), ("child", "children"), ("mouse", "mice"), ("person", "people"),
                ("box", "boxes"), ("woman", "women"), ("sheep", "sheep"), ("goose", "geese"),
                ("letter", "letters"), ("tooth", "teeth"), ("cactus", "cacti"), ("bus", "buses"),
                ("deer", "deer"), ("fish", "fish"), ("series", "series"))  # sheep, deer, …: ambiguous after "the"
NUMBER_LINKS = ("near the", "next to the", "behind the", "for the", "with the", "under the")


def _sentiment(rng: random.Random) -> tuple[str, int]:
    """A review; negations flip a clause, and after "but" the second clause decides."""
    def clause() -> tuple[str, int]:
        good, neg = rng.randrange(2), rng.randrange(3) == 0
        adj = rng.choice(GOOD if good else BAD)
        return (f"{rng.choice(NEGATORS)} {adj}" if neg else adj), int(good) ^ int(neg)

    first, label = clause()
    text = f"the {rng.choice(NOUNS)} was {first}"
    if rng.randrange(2):
        second, label = clause()
        text += f" but the {rng.choice(NOUNS)} was {second}"
    return text, label


def _counts(rng: random.Random) -> tuple[str, int]:
    a, b = rng.sample(range(len(WORDS)), 2)
    f1, f2 = rng.sample(THINGS, 2)
    form = rng.randrange(3)
    if form == 0:
        text = f"there are {WORDS[a]} {f1} and {WORDS[b]} {f2}"
    elif form == 1:
        text = f"{WORDS[a]} {f1} were counted, and also {WORDS[b]} {f2}"
    else:
        text = f"we saw {WORDS[a]} {f1} next to {WORDS[b]} {f2}"
    return text, int(a > b)


def _topic(rng: random.Random) -> tuple[str, int]:
    """The same verbs in every topic, the object decides (a quarter of the objects belong to two topics); a
    phrase shared by the topics ("record", "pressure", "bank", …) is added."""
    if rng.randrange(4):
        label = rng.randrange(len(TOPIC_OBJECTS))
        thing = rng.choice(TOPIC_OBJECTS[label])
    else:  # a quarter: an object two topics share
        thing, pair = rng.choice(TOPIC_SHARED_OBJECTS)
        label = rng.choice(pair)
    words = (rng.choice(SUBJECTS), rng.choice(TOPIC_VERBS), thing, rng.choice(SHARED))
    return " ".join(words), label


def _question(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    template = rng.choice(Q_PAIRS)[1 - label]
    return template.format(n=rng.choice(NOUNS), a=rng.choice(GOOD + BAD)), label


def _tense(rng: random.Random) -> tuple[str, int]:
    """Past, present or future from the verb alone (a time word drawn independently of the label misleads);
    after I/we/you/they, "put", "cut", "read", … read the same in the past and the present (an ambiguity no
    model resolves)."""
    label, plural = rng.randrange(3), rng.randrange(2)  # label 0 past, 1 present, 2 future
    past, third, base = rng.choice(VERBS)
    verb = (past, base if plural else third, f"will {base}")[label]
    text = f"{rng.choice(PLURAL if plural else SINGULAR)} {verb} {rng.choice(TENSE_TAILS)} {rng.choice(TENSE_TIMES)}"
    return text.strip(), label


def _number(rng: random.Random) -> tuple[str, int]:
    """The head noun's number; the attractor noun after it has either number."""
    label = rng.randrange(2)  # 1 = plural
    head, other = rng.sample(NUMBER_NOUNS, 2)
    article = "the" if label else rng.choice(("the", "a"))
    return f"{article} {head[label]} {rng.choice(NUMBER_LINKS)} {other[rng.randrange(2)]}", label


GENERATORS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "sentiment": _sentiment, "counts": _counts, "topic": _topic, "question": _question, "tense": _tense,
    "number": _number,
}


def classes(name: str) -> int:
    return CLASSES.get(name, 2)


def generated(name: str, n_pool: int, n_test: int) -> tuple[list[str], Tensor, list[str], Tensor]:
    """``n_pool`` training-pool and ``n_test`` test sentences of a generated task, all distinct strings.

    Raises:
        WeightlabError: the task's templates cannot give that many distinct sentences.
    """
    rng = random.Random(derive_seed(DATA_SEED, "text-task", name))
    seen: dict[str, int] = {}
    tries = 0
    while len(seen) < n_pool + n_test:
        text, label = GENERATORS[name](rng)
        seen.setdefault(text, label)
        tries += 1
        if tries > 50 * (n_pool + n_test):
            raise WeightlabError(f"text task {name!r} has only {len(seen)} distinct sentences, "
                                 f"fewer than n_train + n_val + n_test = {n_pool + n_test}")
    texts, labels = list(seen), list(seen.values())
    return (texts[:n_pool], torch.tensor(labels[:n_pool]), texts[n_pool:], torch.tensor(labels[n_pool:]))


def headers_text(raw: str) -> str:
    """The header lines of a raw e-mail other than ``Subject:`` and the routing lines (``Received:``,
    ``Return-Path:``, ``Delivered-To:``, ``Message-Id:``, ``X-Spam*``), continuation lines dropped."""
    head, _, _ = raw.partition("\n\n")
    drop = ("subject:", "received:", "return-path:", "delivered-to:", "message-id:", "x-spam", "x-original",
            "x-loop", "errors-to:", "precedence:", "list-", "sender:")
    lines = [line for line in head.splitlines() if line and not line[0].isspace()
             and not line.lower().startswith(drop)]
    return "\n".join(lines)


def subject_text(raw: str) -> str:
    head, _, _ = raw.partition("\n\n")
    return next((line[8:].strip() for line in head.splitlines() if line.lower().startswith("subject:")), "")


EMAIL_VIEWS: dict[str, Callable[[str], str]] = {"spam": email_text, "spam-subject": subject_text,
                                                "spam-headers": headers_text}


def spam_texts(name: str, n_pool: int, n_test: int) -> tuple[list[str], Tensor, list[str], Tensor]:
    """A fixed random subset of SpamAssassin's train (``n_pool``) and test (``n_test``) mails in the task's
    view (:data:`EMAIL_VIEWS`)."""
    from weightlab.data import load_dataset

    out: list = []
    for split, n, salt in (("train", n_pool, 0), ("test", n_test, 1)):
        ds = load_dataset("spam-assassin", split)
        if n > len(ds):
            raise WeightlabError(f"task {name}: spam-assassin {split} has {len(ds)} e-mails, asked for {n}")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(derive_seed(DATA_SEED, salt)))[:n]
        out += [[EMAIL_VIEWS[name](ds.texts[i]) for i in idx.tolist()], ds.y[idx]]
    return out[0], out[1], out[2], out[3]


def task_texts(name: str, n_pool: int, n_test: int) -> tuple[list[str], Tensor, list[str], Tensor]:
    """The task's ``(pool texts, pool labels (n_pool,), test texts, test labels (n_test,))``."""
    if name in SPAM_TASKS:
        return spam_texts(name, n_pool, n_test)
    if name in GENERATORS:
        return generated(name, n_pool, n_test)
    raise WeightlabError(f"unknown text task {name!r}; expected one of {', '.join(TEXT_TASKS_ALL)}")
