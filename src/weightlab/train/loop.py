"""The one training loop (DESIGN.md §5). Methods act through :mod:`weightlab.train.callbacks`.

    state = train(model, dataset, TrainConfig(epochs=2, lr=0.05), callbacks=[Replay(...)])

Deterministic for a given ``config.seed`` on CPU: the shuffling generator is seeded from it, and nothing else
in the loop draws random numbers (callbacks that do should draw from ``state.generator``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from weightlab import distributed
from weightlab.data.arrays import Batch, DataLike, array_view, iter_batches, num_batches, to_batch
from weightlab.errors import WeightlabError
from weightlab.report.progress import track
from weightlab.train.callbacks import Callback, overriding
from weightlab.utils import choose_device

ForwardFn = Callable[[nn.Module, Batch], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for one call of :func:`train`."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    max_steps: int | None = None
    grad_clip: float | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    description: str = "train"

    def __post_init__(self) -> None:
        if self.epochs < 1 and self.max_steps is None:
            raise WeightlabError(f"epochs must be ≥ 1, got {self.epochs}")
        if self.batch_size < 1:
            raise WeightlabError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not self.lr > 0:
            raise WeightlabError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise WeightlabError(f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise WeightlabError(f"schedule must be constant, cosine or step, got {self.schedule!r}")


@dataclass
class LoopState:
    """What callbacks may read (and the loop's result). ``experience`` is whatever the caller passed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device
    generator: torch.Generator
    experience: Any = None
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    loss: Tensor | None = None  # the last step's loss (detached)


def default_forward(model: nn.Module, batch: Batch) -> Tensor:
    """``model(x)``, or ``model(x, t)`` when the batch carries task ids."""
    return model(batch.x) if batch.t is None else model(batch.x, batch.t)


def per_sample_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")


def make_optimizer(params: Sequence[nn.Parameter] | Any, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise WeightlabError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "constant" and config.warmup_steps == 0:
        return None
    warm = max(config.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if config.schedule == "step":
            return 0.1 ** int(progress * 3)  # ÷10 at 1/3 and 2/3 of training
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _sharded_batches(data: Dataset, batch_size: int, generator: torch.Generator):
    """Every rank draws the same global permutation and takes its slice of each full global batch."""
    distributed.check_batch(batch_size)
    fast = array_view(data)
    order = torch.randperm(len(data), generator=generator)  # type: ignore[arg-type]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = distributed.shard(order[start:start + batch_size])
        if fast is not None:
            yield fast.batch(idx)
        else:
            yield to_batch(default_collate([data[i] for i in idx.tolist()]))


def _batches(data: DataLike, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    if distributed.is_distributed():
        return _sharded_batches(data, batch_size, generator)
    return iter_batches(data, batch_size, shuffle=True, generator=generator)


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping. An optimizer that
    keeps its own gradients (LIFT's :class:`~weightlab.methods.lift.optimizer.SparseAdamW` gathers them and
    frees the dense ones) clips those, through its ``clip_grad_norm_`` method."""
    own = getattr(optimizer, "clip_grad_norm_", None)
    if callable(own):
        return own(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


_DEFAULT_CALLBACKS: contextvars.ContextVar[tuple[Callback, ...]] = contextvars.ContextVar("callbacks", default=())


@contextlib.contextmanager
def default_callbacks(*callbacks: Callback) -> Iterator[None]:
    """Add ``callbacks`` to every :func:`train` call inside this block (e.g. a logger set up by the CLI)."""
    token = _DEFAULT_CALLBACKS.set(_DEFAULT_CALLBACKS.get() + callbacks)
    try:
        yield
    finally:
        _DEFAULT_CALLBACKS.reset(token)


def train(model: nn.Module, data: DataLike, config: TrainConfig = TrainConfig(), *,
          callbacks: Sequence[Callback] = (), experience: Any = None,
          optimizer: torch.optim.Optimizer | None = None, loss_fn: LossFn = per_sample_cross_entropy,
          forward: ForwardFn = default_forward) -> LoopState:
    """Train ``model`` on ``data`` for ``config.epochs`` epochs (or ``config.max_steps`` steps).

    Args:
        data: an :class:`~weightlab.data.ArrayDataset` or a ``TensorDataset`` (batched by direct tensor
            indexing), any map-style dataset of ``(x, y)`` / ``(x, y, t)`` samples, or a ``DataLoader``
            (used as it is: its batch size and sampler decide, ``config.batch_size`` does not apply).
        callbacks: method hooks (see :mod:`weightlab.train.callbacks`).
        experience: passed through to callbacks as ``state.experience``.
        optimizer: a ready optimizer (e.g. a sparse one); default: built from ``config``.
        loss_fn: per-sample loss ``(logits, targets) -> (B,)``.
        forward: how to call the model on a batch.

    Returns:
        The final :class:`LoopState` (step count, per-epoch mean losses).

    Under ``torchrun`` the model is wrapped in DistributedDataParallel for the forward pass, every rank takes
    its slice of each global batch of ``config.batch_size`` (incomplete last batches are dropped), and
    callbacks still see the unwrapped model as ``state.model``.
    """
    if num_batches(data, config.batch_size) == 0:
        raise WeightlabError("cannot train on an empty dataset")
    device = choose_device(config.device)
    model.to(device)
    optimizer = optimizer or make_optimizer(model.parameters(), config)
    if distributed.is_distributed():
        if isinstance(data, DataLoader):
            raise WeightlabError("under torchrun pass train() a Dataset, not a DataLoader (the loop shards it)")
        distributed.check_batch(config.batch_size)
        steps_per_epoch = max(len(data) // config.batch_size, 1)  # type: ignore[arg-type]
        net: nn.Module = torch.nn.parallel.DistributedDataParallel(model)
    else:
        steps_per_epoch = num_batches(data, config.batch_size)
        net = model
    total = config.max_steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    schedule = make_schedule(optimizer, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    state = LoopState(model, optimizer, config, device, generator, experience, total_steps=total)
    cbs = [*callbacks, *_DEFAULT_CALLBACKS.get()]
    on_batch, on_logits = overriding(cbs, "on_batch"), overriding(cbs, "transform_logits")
    on_weights, on_loss = overriding(cbs, "sample_weights"), overriding(cbs, "loss")
    on_backward, on_step = overriding(cbs, "after_backward"), overriding(cbs, "after_step")
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if use_amp else None
    # Outside CUDA no autocast or scaler objects are touched at all: on small CPU models their no-op calls
    # are a measurable share of a step.
    precision = (lambda: torch.autocast(device.type)) if use_amp else contextlib.nullcontext

    for cb in overriding(cbs, "on_experience_start"):
        cb.on_experience_start(state)
    model.train()
    for epoch in range(epochs):
        state.epoch = epoch
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for batch in track(_batches(data, config.batch_size, generator), f"{config.description} epoch {epoch + 1}",
                           total=steps_per_epoch):
            batch = batch.to(device)
            for cb in on_batch:
                batch = cb.on_batch(state, batch)
            with precision():
                logits = forward(net, batch)
                for cb in on_logits:
                    logits = cb.transform_logits(state, batch, logits)
                losses = loss_fn(logits, batch.y)  # (B,)
                weights = None
                for cb in on_weights:
                    returned = cb.sample_weights(state, batch, losses)
                    weights = returned if returned is not None else weights
                loss = losses.mean() if weights is None else (weights * losses).sum()
                for cb in on_loss:
                    loss = cb.loss(state, batch, logits, loss)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for cb in on_backward:
                cb.after_backward(state)
            if config.grad_clip is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip_gradients(model, optimizer, config.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if schedule is not None:
                schedule.step()
            state.step += 1
            state.loss = loss.detach()
            for cb in on_step:
                cb.after_step(state)
            loss_sum += state.loss
            n_steps += 1
            if state.step >= total:
                break
        state.epoch_losses.append(float(loss_sum) / max(n_steps, 1))
        if state.step >= total:
            break
    for cb in overriding(cbs, "on_experience_end"):
        cb.on_experience_end(state)
    return state
