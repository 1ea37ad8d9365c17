"""Task-conditioned hypernetworks for continual learning (``rnn-hypernetwork``).

von Oswald et al., "Continual learning with hypernetworks" (ICLR 2020; ``chrhenning/hypnettorch``), and
Chandra et al., "Continual Learning with Dependency Preserving Hypernetworks" (WACV 2023; no public code).

A hypernetwork ``h(e_t, θ)`` maps a trainable task embedding ``e_t`` to all ``P`` weights ``ω_t`` of a target
network, which is then run with those weights (:class:`HyperModel`, through ``torch.func.functional_call``).
Forgetting is prevented by the output regulariser (:class:`OutputRegularizer`)::

    L = L_task + β · (1/|S|) Σ_{j∈S} ‖ h(e_j*, θ*) − h(e_j, θ) ‖²_{(F_j)}

with ``S`` all previous tasks or a random sample of them, and optionally each task's squared error weighted by
the importance ``F_j`` of the target weights (the diagonal Fisher of the target loss in ``ω_j``).

Generators: :class:`MLPHyperNet` (all ``P`` outputs at once), :class:`ChunkedMLPHyperNet` (one shared MLP maps
``[e_t; c_k]`` to chunk ``k``; chunks are independent of each other) and :class:`LSTMHyperNet` (the RNN
hypernetwork: an LSTM reads ``[e_t; c_k]`` for ``k = 1..K`` and emits chunk ``k`` from its hidden state, so a
chunk depends on every earlier chunk; :meth:`LSTMHyperNet.grow` adds hidden units for new tasks).

Assumptions for the RNN hypernetwork (the paper's method section was not available; none is verified):

* one LSTM layer; the input at step ``k`` is ``[e_t; c_k]`` with learned chunk embeddings ``c_k`` shared
  across tasks; a linear read-out ``W_o h_k + b_o`` gives chunk ``k``; ``ω_t = concat(chunks)[:P]``;
* chunks follow the target's parameters in ``named_parameters()`` order (layer by layer, weight then bias);
* "novel regularisation" = the von Oswald output regulariser weighted by per-task Fisher importance of the
  generated weights, each task's importance normalised to mean 1 so that β keeps its meaning;
* "network growth" = ``grow(k)`` adds ``k`` LSTM hidden units whose read-out and recurrent connections into
  the old units start at zero, so the weights generated for old tasks are unchanged at the moment of growth.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from weightlab.data.arrays import Batch
from weightlab.errors import WeightlabError
from weightlab.registry import register
from weightlab.train.callbacks import Callback
from weightlab.train.loop import LoopState, per_sample_cross_entropy


def param_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """The shapes of ``module``'s parameters, in ``named_parameters()`` order."""
    return {name: p.shape for name, p in module.named_parameters()}


def unflatten(flat: Tensor, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Split ``flat`` ``(P,)`` into named tensors of ``shapes`` (views, so gradients flow back)."""
    total = sum(math.prod(s) for s in shapes.values())
    if flat.ndim != 1 or flat.numel() != total:
        raise WeightlabError(f"expected a flat vector of {total} weights, got shape {tuple(flat.shape)}")
    out, start = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[start : start + n].view(shape)
        start += n
    return out


class HyperNetwork(nn.Module, metaclass=abc.ABCMeta):
    """Task embeddings plus a generator of ``n_params`` target weights."""

    def __init__(self, n_params: int, *, emb_dim: int, emb_std: float = 1.0) -> None:
        super().__init__()
        if n_params < 1 or emb_dim < 1:
            raise WeightlabError(f"n_params and emb_dim must be ≥ 1, got {n_params} and {emb_dim}")
        self.n_params, self.emb_dim, self.emb_std = n_params, emb_dim, emb_std
        self.embeddings = nn.ParameterList()

    @property
    def n_tasks(self) -> int:
        return len(self.embeddings)

    def add_task(self) -> int:
        """Append a new trainable task embedding; returns its task id."""
        device = next(self.parameters()).device
        self.embeddings.append(nn.Parameter(torch.randn(self.emb_dim, device=device) * self.emb_std))
        return self.n_tasks - 1

    def forward(self, task_ids: int | Sequence[int]) -> Tensor:
        """Weights ``(P,)`` for one task id, or ``(T, P)`` for a sequence of them."""
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        bad = [t for t in ids if not 0 <= t < self.n_tasks]
        if bad:
            raise WeightlabError(
                f"task id {bad[0]} has no embedding (the hypernetwork knows {self.n_tasks} "
                "tasks; call add_task() first)"
            )
        emb = torch.stack([self.embeddings[t] for t in ids])  # (T, E)
        weights = self.generate(emb)  # (T, P)
        return weights[0] if isinstance(task_ids, int) else weights

    @abc.abstractmethod
    def generate(self, emb: Tensor) -> Tensor:
        """``(T, E)`` task embeddings to ``(T, P)`` target weights."""


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


@register("method", "mlp-hypernetwork")
class MLPHyperNet(HyperNetwork):
    """The full hypernetwork: ``e_t → MLP(hidden) → P`` weights at once."""

    def __init__(self, n_params: int, *, emb_dim: int = 8, hidden: Sequence[int] = (32,)) -> None:
        super().__init__(n_params, emb_dim=emb_dim)
        self.net = _mlp([emb_dim, *hidden, n_params])

    def generate(self, emb: Tensor) -> Tensor:
        return self.net(emb)


class _Chunked(HyperNetwork):
    def __init__(self, n_params: int, *, chunk_size: int, emb_dim: int, chunk_emb_dim: int) -> None:
        super().__init__(n_params, emb_dim=emb_dim)
        if chunk_size < 1:
            raise WeightlabError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.n_chunks = math.ceil(n_params / chunk_size)
        self.chunk_embeddings = nn.Parameter(
            torch.randn(self.n_chunks, chunk_emb_dim)
        )  # c_k, shared by tasks

    def chunk_inputs(self, emb: Tensor) -> Tensor:
        """``[e_t; c_k]`` for every task and chunk: ``(T, K, E + C)``."""
        t, k = emb.shape[0], self.n_chunks
        return torch.cat([emb[:, None].expand(t, k, -1), self.chunk_embeddings[None].expand(t, k, -1)], dim=2)

    def generate(self, emb: Tensor) -> Tensor:
        chunks = self.chunks_from_inputs(self.chunk_inputs(emb))  # (T, K, chunk)
        return chunks.flatten(1)[:, : self.n_params]

    @abc.abstractmethod
    def chunks_from_inputs(self, inputs: Tensor) -> Tensor:
        """``(T, K, E + C)`` chunk inputs to ``(T, K, chunk_size)`` chunks."""


@register("method", "chunked-mlp-hypernetwork")
class ChunkedMLPHyperNet(_Chunked):
    """One MLP maps ``[e_t; c_k]`` to chunk ``k`` (hypnettorch's ``ChunkedHMLP``); chunks are independent."""

    def __init__(
        self,
        n_params: int,
        *,
        chunk_size: int,
        emb_dim: int = 8,
        chunk_emb_dim: int = 8,
        hidden: Sequence[int] = (32,),
    ) -> None:
        super().__init__(n_params, chunk_size=chunk_size, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim)
        self.net = _mlp([emb_dim + chunk_emb_dim, *hidden, chunk_size])

    def chunks_from_inputs(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)


@register("method", "rnn-hypernetwork")
class LSTMHyperNet(_Chunked):
    """The RNN hypernetwork: an LSTM over the chunks; chunk ``k`` is read out from hidden state ``h_k``."""

    def __init__(
        self, n_params: int, *, chunk_size: int, emb_dim: int = 8, chunk_emb_dim: int = 8, hidden: int = 32
    ) -> None:
        super().__init__(n_params, chunk_size=chunk_size, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim)
        self.lstm = nn.LSTM(emb_dim + chunk_emb_dim, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, chunk_size)

    def chunks_from_inputs(self, inputs: Tensor) -> Tensor:
        states, _ = self.lstm(inputs)  # (T, K, H)
        return self.readout(states)

    @torch.no_grad()
    def grow(self, extra: int) -> None:
        """Add ``extra`` hidden units without changing any generated weight (new read-out columns and the new
        units' recurrent weights into the old units start at zero)."""
        if extra < 1:
            raise WeightlabError(f"grow() needs extra ≥ 1 hidden units, got {extra}")
        old, h = self.lstm, self.lstm.hidden_size
        new = nn.LSTM(old.input_size, h + extra, batch_first=True).to(old.weight_ih_l0.device)
        scale = 1.0 / math.sqrt(h + extra)
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            src, dst = getattr(old, name), getattr(new, name)
            dst.uniform_(-scale, scale)
            for g in range(4):  # gates i, f, g, o are stacked along dim 0
                rows_old, rows_new = slice(g * h, (g + 1) * h), slice(g * (h + extra), g * (h + extra) + h)
                if name == "weight_hh_l0":
                    dst[rows_new, :h] = src[rows_old]
                    dst[rows_new, h:] = 0.0  # new units do not feed the old ones
                else:
                    dst[rows_new] = src[rows_old]
        readout = nn.Linear(h + extra, self.chunk_size).to(self.readout.weight.device)
        readout.weight.zero_()
        readout.weight[:, :h] = self.readout.weight
        readout.bias.copy_(self.readout.bias)
        self.lstm, self.readout = new, readout


class HyperModel(nn.Module):
    """A target network run with the weights its hypernetwork generates for the batch's task.

    Only the hypernetwork is registered as a submodule, so ``parameters()`` are the trainable ones
    (embeddings and θ); the target module only supplies the architecture.
    """

    def __init__(self, target: nn.Module, hnet: HyperNetwork) -> None:
        super().__init__()
        shapes = param_shapes(target)
        if sum(math.prod(s) for s in shapes.values()) != hnet.n_params:
            raise WeightlabError(
                f"the hypernetwork generates {hnet.n_params} weights but the target has "
                f"{sum(math.prod(s) for s in shapes.values())}"
            )
        self._target = [target]  # a list, so that the target's own parameters are not registered
        self.shapes = shapes
        self.hnet = hnet

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def _apply(self, fn, *args, **kwargs):
        self._target[0]._apply(fn, *args, **kwargs)  # ``.to(device)`` moves the target's buffers too
        return super()._apply(fn, *args, **kwargs)

    def target_weights(self, task_id: int) -> dict[str, Tensor]:
        return unflatten(self.hnet(task_id), self.shapes)

    def forward(self, x: Tensor, task_id: int | Tensor) -> Tensor:  # (B, ...) -> (B, classes)
        if isinstance(task_id, int):
            return functional_call(self.target, self.target_weights(task_id), (x,))
        ids = torch.unique(task_id).tolist()
        if len(ids) == 1:
            return functional_call(self.target, self.target_weights(ids[0]), (x,))
        outs = {t: functional_call(self.target, self.target_weights(t), (x[task_id == t],)) for t in ids}
        out = next(iter(outs.values())).new_empty((x.shape[0], next(iter(outs.values())).shape[1]))
        for t, o in outs.items():
            out[task_id == t] = o
        return out


def output_regularizer(
    hnet: HyperNetwork, targets: Tensor, task_ids: Sequence[int], *, importance: Tensor | None = None
) -> Tensor:
    """``(1/|S|) Σ_{j∈S} Σ_p F_jp (target_jp − h(e_j)_p)²`` with ``targets`` ``(|S|, P)`` (F = 1 if None)."""
    if targets.shape != (len(task_ids), hnet.n_params):
        raise WeightlabError(
            f"targets must have shape ({len(task_ids)}, {hnet.n_params}), got {tuple(targets.shape)}"
        )
    sq = (targets - hnet(list(task_ids))) ** 2  # (|S|, P)
    if importance is not None:
        sq = sq * importance.to(sq.device)
    return sq.sum(1).mean()


@dataclass(frozen=True)
class HnetRegConfig:
    """β of the output regulariser (hypercl split-MNIST default 0.01), how many previous tasks to sample per
    step (None: all), and whether to weight by Fisher importance of the generated weights."""

    beta: float = 0.01
    n_sampled: int | None = None
    importance: bool = False
    fisher_samples: int = 128

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise WeightlabError(f"beta must be ≥ 0, got {self.beta}")
        if self.n_sampled is not None and self.n_sampled < 1:
            raise WeightlabError(f"n_sampled must be ≥ 1 or None, got {self.n_sampled}")


@register("method", "output-regularizer")
class OutputRegularizer(Callback):
    """The output regulariser as a callback: targets ``h(e_j*, θ*)`` of tasks ``j < t`` are frozen at the
    start of task ``t`` (``state.experience.task_id``), and ``β·R`` is added to every step's loss."""

    def __init__(self, model: HyperModel, config: HnetRegConfig = HnetRegConfig()) -> None:
        self.model, self.config = model, config
        self.targets: Tensor | None = None  # (t, P)
        self.importance: list[Tensor] = []  # one (P,) per finished task, mean 1

    def on_experience_start(self, state: LoopState) -> None:
        task = int(getattr(state.experience, "task_id", 0))
        with torch.no_grad():
            self.targets = self.model.hnet(list(range(task))).detach() if task > 0 else None

    def loss(self, state: LoopState, batch: Batch, logits: Tensor, loss: Tensor) -> Tensor:
        if self.targets is None or self.config.beta == 0:
            return loss
        ids = list(range(self.targets.shape[0]))
        if self.config.n_sampled is not None and self.config.n_sampled < len(ids):
            pick = torch.randperm(len(ids), generator=state.generator)[: self.config.n_sampled]
            ids = sorted(pick.tolist())
        imp = torch.stack([self.importance[j] for j in ids]) if self.config.importance else None
        return loss + self.config.beta * output_regularizer(
            self.model.hnet, self.targets[ids], ids, importance=imp
        )

    def on_experience_end(self, state: LoopState) -> None:
        if not self.config.importance:
            return
        task = int(getattr(state.experience, "task_id", 0))
        data = state.experience.train
        self.importance.append(
            weight_importance(self.model, data.batch(slice(0, self.config.fisher_samples)), task)
        )


def weight_importance(model: HyperModel, batch: Batch, task_id: int) -> Tensor:
    """Diagonal empirical Fisher of the target loss in the generated weights ``ω_t`` ``(P,)``, mean 1."""
    with torch.no_grad():
        flat = model.hnet(task_id).detach()
    batch = batch.to(flat.device)
    fisher = torch.zeros_like(flat)
    for i in range(len(batch)):
        w = flat.clone().requires_grad_(True)
        logits = functional_call(model.target, unflatten(w, model.shapes), (batch.x[i : i + 1],))
        (g,) = torch.autograd.grad(per_sample_cross_entropy(logits, batch.y[i : i + 1]).sum(), w)
        fisher += g**2
    fisher /= max(len(batch), 1)
    return fisher / fisher.mean().clamp_min(1e-12)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
