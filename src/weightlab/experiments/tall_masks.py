"""Experiment ``tall-masks``: TALL masks recover the fine-tuned models from a merge; Consensus beats TA.

The paper's regime: a strongly pretrained network, fine-tuned briefly on each task, gives small, mostly
disjoint task vectors. Here the network is the ImageNet EfficientNet-Lite0 (``weightlab.models.pretrained``);
its last stage (block 6, ``conv_head``, ``bn2``: 1.0M of 4.65M parameters) is fine-tuned with Adam at a low
learning rate on each of 8 (or 14) real-image tasks built from Fashion-MNIST, MNIST and digits
(:mod:`weightlab.experiments._merge_tasks`), on trunk features computed once and cached (so the CPU budget
fits), each task with its own frozen head (unit-norm class centroids of the pretrained features: a fixed
"zero-shot" head like CLIP's text heads). The fine-tuned tails are merged with the paper's methods, α and λ_t
chosen on each task's validation split as the reference code does, and scored on each task's test split.
Claims: TALL mask + TA keeps ≥ 99% normalized accuracy; Consensus TA > task arithmetic. Every seed also
records the diagnostics that say whether the claims are testable (task-vector sizes and cosines, TA's α
against 1/T, selfish / catastrophic weights, TA minus weight averaging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from weightlab import merging
from weightlab.data import ArrayDataset, stratified_split
from weightlab.errors import WeightlabError
from weightlab.experiments._merge_tasks import (
    CUT,
    IMAGE_TASKS,
    TASKS_8,
    TASKS_14,
    TASKS_DIGITS,
    TaskName,
    TaskNet,
    cached_features,
    centroid_head,
    load_tail,
    split_lite0,
    tail_state,
)
from weightlab.experiments._tall_masks_report import summarise
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Positive, Range
from weightlab.runs import TrialContext
from weightlab.train import TrainConfig, accuracy, train
from weightlab.utils import derive_seed

State = dict[str, Tensor]
Density = Annotated[float, Range(0, 1, lo_open=True)]


@dataclass(frozen=True)
class TallMasksExpConfig(ExperimentConfig):
    seeds: Count = 5
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"  # digits: digits tasks only (smoke)
    model: Literal["efficientnet_lite0"] = "efficientnet_lite0"
    tasks: tuple[TaskName, ...] = TASKS_8
    image_size: Literal[32, 64, 96] = 64
    n_train: Count = 1000
    n_val: Count = 500
    n_test: Count = 1000
    head_scale: Positive = 20.0
    steps: Count = 100
    lr: Positive = 1e-4
    batch_size: Count = 64
    density: Density = 0.2
    k: Count = 2
    k_ablation: tuple[Count, ...] = ()
    magnitude_density: Density = 0.1
    text_check: bool = False  # also merge three generated text tasks on the real MiniLM (first seed)

    def check(self) -> None:
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise WeightlabError(f"tasks must name at least 2 distinct tasks, got {', '.join(self.tasks)}")
        if self.data == "digits":
            other = [t for t in self.tasks if IMAGE_TASKS[t].source != "digits"]
            if other:
                raise WeightlabError(f"data=digits runs only the digits tasks ({', '.join(TASKS_DIGITS)}); "
                                     f"got {', '.join(other)}")


@dataclass
class Task:
    """One task's trunk features and labels, split by the seed into train and validation."""

    name: str
    classes: int
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def load_task(name: TaskName, trunk: torch.nn.Module, config: TallMasksExpConfig, seed: int) -> Task:
    """The task's cached features; the pool is split (stratified, by the seed) into train and validation."""
    spec = IMAGE_TASKS[name]
    feats = cached_features(spec, trunk, image_size=config.image_size, n_pool=config.n_train + config.n_val,
                            n_test=config.n_test)
    pool_y = feats["pool_y"]
    if len(pool_y) <= config.n_val:
        raise WeightlabError(f"task {name}: {len(pool_y)} training images, not more than n_val={config.n_val}")
    keep, held = stratified_split(pool_y, config.n_val / len(pool_y),
                                  generator=torch.Generator().manual_seed(derive_seed(seed, "split", name)))
    pool = ArrayDataset(feats["pool_x"], pool_y)
    return Task(name, spec.classes, pool.subset(keep), pool.subset(held),
                ArrayDataset(feats["test_x"], feats["test_y"]))


def finetune(net: TaskNet, theta0: State, task: Task, config: Any, seed: int) -> tuple[State, dict]:
    """Fine-tune the tail from θ_0 with the task's head frozen; the state and the training record."""
    load_tail(net.tail, theta0)
    net.tail.requires_grad_(True)
    state = train(net, task.train, TrainConfig(max_steps=config.steps, lr=config.lr, optimizer="adam",
                                               batch_size=config.batch_size, seed=seed,
                                               description=f"fine-tune {task.name}"))
    record = {"epoch_losses": state.epoch_losses, "train_acc": accuracy(net, task.train)}
    return tail_state(net.tail), record


def run_seed(config: TallMasksExpConfig, seed: int, ctx: TrialContext | None = None) -> dict[str, Any]:
    """Build the heads, fine-tune every task and merge, for one seed; accuracies per method and task plus the
    diagnostics."""
    from weightlab.models import pretrained

    trunk, tail = split_lite0(pretrained(config.model))
    tasks = [load_task(name, trunk, config, seed) for name in config.tasks]
    return fit_and_merge(config, tail, tasks, seed, ctx)


def fit_and_merge(config: Any, tail: torch.nn.Module, tasks: list[Task], seed: int,
                  ctx: TrialContext | None = None) -> dict[str, Any]:
    """Centroid heads on the pretrained ``tail``, one fine-tune of it per task, every merge of the paper's
    table and the diagnostics (shared by the image and the text experiments; ``config`` has the fields of
    :class:`TallMasksExpConfig` from ``head_scale`` on)."""
    theta0 = tail_state(tail)
    nets = [TaskNet(tail, centroid_head(tail, t.train.x, t.train.y, t.classes), config.head_scale) for t in tasks]
    finetuned, training = [], []
    for i, (net, task) in enumerate(zip(nets, tasks, strict=True)):
        unit = derive_seed(seed, "finetune", task.name) if ctx is None else ctx.seeded("finetune", task.name)
        state, record = finetune(net, theta0, task, config, unit)
        finetuned.append(state)
        training.append(record | {"task": task.name, "n_train": len(task.train), "n_val": len(task.val),
                                  "n_test": len(task.test), "index": i})

    def score(t: int, state: State, split: str) -> float:
        load_tail(tail, state)
        return accuracy(nets[t], getattr(tasks[t], split), batch_size=1000)

    def all_scores(state: State, split: str) -> list[float]:
        return [score(t, state, split) for t in range(len(tasks))]

    out = evaluate_methods(config, theta0, finetuned, score, all_scores)
    out["diagnostics"] |= vector_diagnostics(theta0, merging.task_vectors(theta0, finetuned))
    return out | {"tasks": [t.name for t in tasks], "training": training}


def flat(state: State) -> Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])  # (d,)


def vector_diagnostics(theta0: State, taus: list[State]) -> dict[str, Any]:
    """‖τ_t‖ / ‖θ_0‖, the fraction of entries each τ_t changes, and the pairwise cosine matrix ``(T, T)``."""
    base = flat(theta0).norm()
    vectors = torch.stack([flat(tau) for tau in taus])  # (T, d)
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {"tau_rel_norm": (vectors.norm(dim=1) / base).tolist(),
            "tau_changed": (vectors != 0).double().mean(dim=1).tolist(),
            "cosine": (unit @ unit.T).tolist()}


def evaluate_methods(
    config: Any,
    theta0: State,
    finetuned: list[State],
    score: Callable[[int, State, str], float],
    all_scores: Callable[[State, str], list[float]],
) -> dict[str, Any]:
    """Every method's test accuracies, with α / λ chosen on validation data (the reference protocol)."""
    T = len(finetuned)
    taus = merging.task_vectors(theta0, finetuned)
    ft_val = [score(t, finetuned[t], "val") for t in range(T)]
    acc: dict[str, list[float]] = {"zero-shot": all_scores(theta0, "test")}
    tau_ta = merging.task_arithmetic(taus)
    acc["weight averaging"] = all_scores(merging.apply(theta0, tau_ta, 1.0 / T), "test")
    tau_ties_sum = merging.ties_merge(taus, density=config.density, reduce="sum")
    chosen: dict[str, Any] = {}

    def tuned(name: str, vector: State) -> None:
        alpha, _ = merging.select_alpha(theta0, vector, lambda s: all_scores(s, "val"), ft_val)
        chosen[f"alpha {name}"] = alpha
        acc[name] = all_scores(merging.apply(theta0, vector, alpha), "test")

    tuned("task arithmetic", tau_ta)
    tuned("TIES", merging.ties_merge(taus, density=config.density, reduce="mean"))
    masks = {}
    for label, tau_mtl in (("TA", tau_ta), ("TIES", tau_ties_sum)):
        lams, masks[label], _ = merging.select_lambdas(theta0, tau_mtl, taus, lambda t, s: score(t, s, "val"))
        chosen[f"lambdas {label}"] = lams
        tuned(f"Consensus {label}", merging.masked(tau_mtl, merging.consensus_mask(masks[label], config.k)))
    for k in config.k_ablation:  # Consensus TA with other k (data only; k = config.k is in the main table)
        tuned(f"Consensus TA (k={k})", merging.masked(tau_ta, merging.consensus_mask(masks["TA"], k)))
    mag = merging.magnitude_masks(taus, density=config.magnitude_density)
    acc["magnitude masking"] = [score(t, merging.apply(theta0, tau_ta, 1.0, mag[t]), "test") for t in range(T)]
    for label, tau_mtl in (("TA", tau_ta), ("TIES", tau_ties_sum)):
        acc[f"TALL mask + {label}"] = [
            score(t, merging.apply(theta0, tau_mtl, 1.0, masks[label][t]), "test") for t in range(T)
        ]
    acc["fine-tuned"] = [score(t, finetuned[t], "test") for t in range(T)]
    params = sum(v.numel() for v in theta0.values())
    hist = merging.agreement_histogram(merging.mask_agreement(masks["TA"]), T)
    # where TALL + TA misses: the task's own vector inside its mask, θ_0 + m_t ∘ τ_t (no other task's deltas)
    own = [score(t, merging.apply(theta0, taus[t], 1.0, masks["TA"][t]), "test") for t in range(T)]
    diagnostics = {"tall_own_vector": own, "ft_val": ft_val, "mask_density_TA": [
        float(flat({k: m.double() for k, m in mask.items()}).mean()) for mask in masks["TA"]]}
    return {"acc": acc, "chosen": chosen, "params": params, "agreement": hist, "diagnostics": diagnostics}


def trial(config: TallMasksExpConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """One seed's fine-tuning and merges; the first seed also runs the MiniLM check when ``text_check``."""
    record = run_seed(config, seed, ctx)
    if config.text_check and seed == config.seed:
        from weightlab.experiments._tall_masks_minilm import minilm_check

        record["minilm"] = ctx.cached("minilm", lambda: minilm_check(seed=config.seed))
    return record


experiment("tall-masks", paper="tall-masks", config=TallMasksExpConfig, trial=trial, summarise=summarise,
           summary="TALL masks + TA recover ≥99% of fine-tuned accuracy; Consensus TA beats task arithmetic "
                   f"(EfficientNet-Lite0 tail after block {CUT - 1}, real-image tasks)",
           profiles={"smoke": {"seeds": 1, "data": "digits", "tasks": TASKS_DIGITS[:2], "image_size": 32,
                               "n_train": 100, "n_val": 100, "n_test": 150, "steps": 10, "batch_size": 32},
                     "full": {"tasks": TASKS_14, "k_ablation": (1, 3), "text_check": True}})
