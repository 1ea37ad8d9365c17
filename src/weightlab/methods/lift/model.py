"""LIFT: Low-rank Informed Sparse Fine-Tuning (paper key ``lift``; Liu et al., ICML 2025, arXiv 2506.00772).

Fine-tune only the *principal weights* of every linear layer: the ``k`` entries of largest magnitude in the
rank-``r`` approximation of the weight, with ``k`` the parameter count of a rank-``lora_rank`` LoRA
(``k = (m + n)·lora_rank``, about 5% of a LLaMA matrix at ``lora_rank=128``). Masks are re-selected every
``refresh_every`` steps. Embeddings, norms, biases and the output head stay frozen.

    lift = prepare(model, LiftConfig(rank=8, lora_rank=8, refresh_every=100, lr=1e-3))
    lift.print_trainable_parameters()                                     # the LIFT entries, as PEFT prints
    train(model, data, TrainConfig(epochs=3), optimizer=lift.optimizer)   # the weightlab loop
    # or: Trainer(model=model, args=args, **lift.trainer_kwargs()) / any plain PyTorch loop
    delta = lift.extract_delta()                                          # {name.weight: (m, n)} update
    lift.save_pretrained("adapter")                                       # config + sparse delta (safetensors)
    model = lift.merge_and_unload()                                       # plain module, hooks removed
    model = from_pretrained(fresh_base, "adapter")                        # the same weights, bit for bit

Memory: the optimizer holds O(k) per matrix (indices, two moments) and frees each dense gradient as soon as
it is gathered (see :mod:`weightlab.methods.lift.optimizer`). ``track_delta`` keeps the original value of every
entry the masks have touched (another O(k)) so :func:`extract_delta` needs no copy of the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.lift.optimizer import Selector, SparseAdamW
from weightlab.methods.lift.sampled import masked_grad_linear, unmask_grad_linear
from weightlab.registry import register
from weightlab.weights.lowrank import (
    density_budget,
    gradient_mask,
    lora_budget,
    magnitude_mask,
    principal_weight_mask,
    random_mask,
)

if TYPE_CHECKING:
    from weightlab.train.callbacks import Callback

MaskKind = Literal["principal", "magnitude", "random", "gradient"]
MASKS = ("principal", "magnitude", "random", "gradient")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_EXCLUDE = ("lm_head", "classifier", "score", "head")


@dataclass(frozen=True)
class LiftConfig:
    """LIFT settings (defaults: the paper's recommended ``lora_rank = filter rank = 128``, AdamW betas
    (0.9, 0.95), eps 1e-6, no weight decay, lr 2e-4).

    Attributes:
        rank: filter rank ``r`` of the low-rank approximation the mask is selected from.
        lora_rank: budget ``k = min((m + n)·lora_rank, m·n)`` per matrix (128 when ``density`` is unset).
        density: alternatively, the fraction of entries of each matrix to train (not with ``lora_rank``).
        target_modules: names (dotted suffixes/components) of the ``nn.Linear`` modules to fine-tune;
            ``None``: every ``nn.Linear`` not excluded.
        exclude_modules: names never targeted (the output head by default).
        modules_to_save: modules trained densely with AdamW (e.g. a freshly initialised classifier).
        refresh_every: re-select the masks after this many optimizer steps (0: never).
        mask: ``principal`` (LIFT), or the baselines ``magnitude``, ``random``, ``gradient``.
        largest: keep the largest entries (the paper); ``False`` is the official configs' smallest-entry mask.
        randomized: select from :func:`torch.svd_lowrank` instead of the exact SVD.
        niter: power iterations of the randomized SVD.
        track_delta: remember original values of touched entries so :func:`extract_delta` works.
        max_grad_norm: clip the global gradient norm inside the optimizer (dense gradients are freed early,
            so an outer ``clip_grad_norm_`` does not see them).
        sparse_grad: compute only the masked entries of each target's weight gradient in the backward pass
            (a sampled matmul), so no dense ``(m, n)`` gradient is ever formed; not with gradient masks.
        seed: seed of the random mask.
    """

    rank: int = 128
    lora_rank: int | None = None
    density: float | None = None
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = DEFAULT_EXCLUDE
    modules_to_save: tuple[str, ...] = ()
    refresh_every: int = 400
    mask: MaskKind = "principal"
    largest: bool = True
    randomized: bool = False
    niter: int = 4
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    track_delta: bool = True
    sparse_grad: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise WeightlabError(f"rank must be ≥ 1, got {self.rank}")
        if self.lora_rank is not None and self.density is not None:
            raise WeightlabError(f"give lora_rank ({self.lora_rank}) or density ({self.density}), not both")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise WeightlabError(f"lora_rank must be ≥ 1, got {self.lora_rank}")
        if self.density is not None and not 0 < self.density <= 1:
            raise WeightlabError(f"density must be in (0, 1], got {self.density}")
        if self.sparse_grad and self.mask == "gradient":
            raise WeightlabError("sparse_grad=True never forms the dense gradient that mask='gradient' ranks")
        if self.mask not in MASKS:
            raise WeightlabError(f"mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.refresh_every < 0:
            raise WeightlabError(f"refresh_every must be ≥ 0 (0 = never), got {self.refresh_every}")
        if not self.lr > 0:
            raise WeightlabError(f"lr must be > 0, got {self.lr}")

    def budget(self, shape: tuple[int, int]) -> int:
        """Trainable entries ``k`` of a matrix of ``shape``."""
        if self.density is not None:
            return density_budget(shape, self.density)
        return lora_budget(shape, self.lora_rank or 128)


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` is the whole dotted ``name`` or a run of its dotted components (``attn.qkv`` in
    ``blocks.0.attn.qkv``)."""
    return name == pattern or f".{pattern}." in f".{name}."


def find_targets(model: nn.Module, config: LiftConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules LIFT fine-tunes, by name.

    Raises:
        WeightlabError: nothing matches (the message lists the linear layers the model has), or a target's
            weight has an unsupported dtype.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {n: m for n, m in linears.items()
              if (config.target_modules is None or any(_matches(n, t) for t in config.target_modules))
              and not any(_matches(n, e) for e in config.exclude_modules)
              and not any(_matches(n, s) for s in config.modules_to_save)}
    if not chosen:
        found = ", ".join(list(linears)[:20]) + (" ..." if len(linears) > 20 else "")
        raise WeightlabError(f"no nn.Linear module matches target_modules={config.target_modules} "
                             f"(excluding {config.exclude_modules}); the model's linear layers are: "
                             f"{found or '(none)'}")
    for n, m in chosen.items():
        if m.weight.dtype not in SUPPORTED_DTYPES:
            raise WeightlabError(f"module {n!r} has weights of dtype {m.weight.dtype}; LIFT supports "
                                 f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        rows, cols = m.weight.shape
        if config.mask == "principal" and config.rank > min(rows, cols):
            raise WeightlabError(f"rank {config.rank} exceeds min(m, n) = {min(rows, cols)} of {n!r} "
                                 f"({rows}×{cols}); choose rank ≤ {min(rows, cols)} or restrict "
                                 "target_modules")
    return chosen


def make_selector(config: LiftConfig, k: int, *, generator: torch.Generator | None = None) -> Selector:
    """The mask rule of ``config`` as ``selector(weight, grad) -> sorted flat indices (k,)``."""
    def select(weight: Tensor, grad: Tensor | None) -> Tensor:
        if config.mask == "principal":
            idx = principal_weight_mask(weight, config.rank, k, randomized=config.randomized,
                                        niter=config.niter, largest=config.largest)
        elif config.mask == "magnitude":
            idx = magnitude_mask(weight, k, largest=config.largest)
        elif config.mask == "random":
            idx = random_mask(weight.shape, k, generator=generator)
        else:
            if grad is None:
                raise WeightlabError("the gradient mask needs a gradient")
            idx = gradient_mask(grad, k)
        return idx.to(weight.device)

    return select


class Lift:
    """What :func:`prepare` returns: the model, its targets, the sparse optimizer, the delta bookkeeping."""

    def __init__(self, model: nn.Module, config: LiftConfig, targets: dict[str, nn.Linear],
                 saved: dict[str, nn.Parameter], requires_grad: dict[str, bool]) -> None:
        self.model = model
        self.config = config
        self.targets = targets
        self.saved = saved
        self._requires_grad = requires_grad
        self._names = {id(m.weight): f"{n}.weight" for n, m in targets.items()}
        self.touched: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (sorted indices, original values)
        generator = torch.Generator().manual_seed(config.seed)
        weights = [m.weight for m in targets.values()]
        selectors = [make_selector(config, config.budget(tuple(w.shape)), generator=generator)
                     for w in weights]
        groups: list[dict] = [{"params": weights, "sparse": True, "selectors": selectors}]
        if saved:
            groups.append({"params": list(saved.values()), "sparse": False})
        self.optimizer = _build(groups, config, self._record if config.track_delta else None)

    def _record(self, p: nn.Parameter, old: Tensor, new: Tensor) -> None:
        """Remember the original value of every entry the first time it enters a mask."""
        name = self._names[id(p)]
        idx, base = self.touched.get(name, (torch.zeros(0, dtype=torch.long, device=p.device),
                                            torch.zeros(0, dtype=p.dtype, device=p.device)))
        fresh = new.long()[~torch.isin(new.long(), idx)]
        values = p.detach().reshape(-1)[fresh]
        idx, order = torch.sort(torch.cat([idx, fresh]))
        self.touched[name] = (idx, torch.cat([base, values])[order])

    def trainable_entries(self) -> int:
        """Entries currently trainable: ``Σ k`` over targets plus densely trained parameters."""
        sparse = sum(self.config.budget(tuple(m.weight.shape)) for m in self.targets.values())
        return sparse + sum(p.numel() for p in self.saved.values())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` as PEFT counts them: the entries LIFT trains (not the whole target matrices,
        which keep ``requires_grad=True`` for autograd) and every parameter of the model."""
        return self.trainable_entries(), sum(p.numel() for p in self.model.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the counts of :meth:`get_nb_trainable_parameters` in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def check_stepped(self, what: str) -> None:
        """Raise if gradients were gathered but the optimizer never stepped (e.g. a Trainer given its own)."""
        opt = self.optimizer
        if opt.steps == 0 and opt.unstepped_backward_passes > 0:
            raise WeightlabError(
                f"{what}: LIFT's optimizer gathered gradients of {opt.unstepped_backward_passes} backward passes "
                "but was never stepped, so no LIFT entry changed; step lift.optimizer (with the transformers "
                "Trainer: Trainer(..., **lift.trainer_kwargs()), i.e. optimizers=(lift.optimizer, None))")

    def extract_delta(self, *, dense: bool = True) -> dict[str, Tensor]:
        """:func:`extract_delta` of this handle."""
        return extract_delta(self, dense=dense)

    def merge_and_unload(self) -> nn.Module:
        """:func:`merge_and_unload` of the model; returns the plain module."""
        return merge_and_unload(self.model)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the config and the sparse delta to the folder ``path`` like a PEFT adapter (see
        :mod:`weightlab.methods.lift.adapter`); :func:`~weightlab.methods.lift.adapter.from_pretrained` adds
        it to a fresh base."""
        from weightlab.methods.lift.adapter import save_pretrained

        return save_pretrained(self, path)

    def trainer_kwargs(self, *, callbacks: Sequence[Callback] = (), experience: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``transformers.Trainer``: ``optimizers=(self.optimizer, None)`` and a callback
        that checks the optimizer is stepped, reports the true trainable count, moves the Trainer's gradient
        clipping onto LIFT's gathered gradients, and runs weightlab ``callbacks`` (with ``experience`` as
        their ``state.experience``; see :mod:`weightlab.integrations.hf`)."""
        from weightlab.integrations.hf import WeightlabCallback

        callback = WeightlabCallback(*callbacks, lift=self, experience=experience)
        return {"optimizers": (self.optimizer, None), "callbacks": [callback]}


def _build(groups: list[dict], config: LiftConfig, record) -> SparseAdamW:
    return SparseAdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                       weight_decay=config.weight_decay, refresh_every=config.refresh_every,
                       needs_grad=config.mask == "gradient",
                       max_grad_norm=config.max_grad_norm, on_refresh=record)


def prepare(model: nn.Module, config: LiftConfig = LiftConfig()) -> Lift:
    """Freeze ``model`` except the principal weights of its target linear layers (and ``modules_to_save``).

    Returns a :class:`Lift` whose ``optimizer`` (a :class:`SparseAdamW`) is what to step; the handle is also
    attached to the model, so ``extract_delta(model)`` and ``merge_and_unload(model)`` find it.

    Raises:
        WeightlabError: no target matches, a target has an unsupported dtype, ``rank`` exceeds a target's
            ``min(m, n)``, or a ``modules_to_save`` name matches nothing.
    """
    if getattr(model, "_weightlab_lift", None) is not None:
        raise WeightlabError("this model is already prepared for LIFT; call merge_and_unload(model) first")
    targets = find_targets(model, config)
    saved: dict[str, nn.Parameter] = {}
    for n, m in model.named_modules():
        if any(_matches(n, s) for s in config.modules_to_save):
            for pn, p in m.named_parameters():
                saved[f"{n}.{pn}"] = p
    missing = [s for s in config.modules_to_save if not any(_matches(n, s) for n, _ in model.named_modules())]
    if missing:
        raise WeightlabError(f"modules_to_save {missing} match no module of the model")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    for p in saved.values():
        p.requires_grad_(True)
    lift = Lift(model, config, targets, saved, requires_grad)
    ignore_in_ddp(model, [f"{n}.weight" for n in targets])
    if config.sparse_grad:
        for m in targets.values():
            masked_grad_linear(m, lift.optimizer)
    model._weightlab_lift = lift  # type: ignore[attr-defined]
    return lift


DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"
"""The attribute ``DistributedDataParallel`` reads, when it wraps a module, for the parameter names it must not
all-reduce (what its ``_set_params_and_buffers_to_ignore_for_model`` sets)."""


def ignore_in_ddp(model: nn.Module, names: list[str]) -> None:
    """Keep DDP away from the target weights ``names``: LIFT gathers their dense gradients and frees them (or
    never forms them) before DDP's all-reduce, and :meth:`SparseAdamW.synchronize` averages the gathered
    ``(k,)`` gradients instead, so DDP needs no weight-sized buckets for them. Applies when DDP wraps ``model``
    itself (torchrun, accelerate, the weightlab loop). DDP refuses a module with nothing left to all-reduce,
    so when the targets are all that trains nothing is ignored: DDP then all-reduces their dense (or zero)
    gradients to no use, and the update is still the averaged one."""
    names_set = set(names)
    if not any(p.requires_grad for n, p in model.named_parameters() if n not in names_set):
        return
    kept = list(getattr(model, DDP_IGNORE, ()))
    setattr(model, DDP_IGNORE, kept + [n for n in names if n not in kept])
    model._weightlab_lift_ddp_ignored = [n for n in names if n not in kept]  # type: ignore[attr-defined]


def _unignore_in_ddp(model: nn.Module) -> None:
    added = set(model.__dict__.pop("_weightlab_lift_ddp_ignored", ()))
    left = [n for n in getattr(model, DDP_IGNORE, ()) if n not in added]
    if left:
        setattr(model, DDP_IGNORE, left)
    else:
        model.__dict__.pop(DDP_IGNORE, None)


def _handle(obj: nn.Module | Lift) -> Lift:
    lift = obj if isinstance(obj, Lift) else getattr(obj, "_weightlab_lift", None)
    if lift is None:
        raise WeightlabError("this model was not prepared for LIFT "
                             "(call weightlab.methods.lift.model.prepare first)")
    return lift


def extract_delta(obj: nn.Module | Lift, *, dense: bool = True) -> dict[str, Tensor]:
    """The sparse update LIFT has made, as a state dict.

    Args:
        obj: the prepared model or its :class:`Lift` handle.
        dense: ``{name.weight: (m, n) delta}`` with zeros outside the touched entries (feeds task-vector
            arithmetic); ``False``: ``{name.weight.indices: (t,), name.weight.values: (t,)}``
            (safetensors-ready).
    """
    lift = _handle(obj)
    if not lift.config.track_delta:
        raise WeightlabError("extract_delta needs LiftConfig(track_delta=True)")
    lift.check_stepped("extract_delta")
    out: dict[str, Tensor] = {}
    for n, m in lift.targets.items():
        name = f"{n}.weight"
        idx, base = lift.touched.get(name, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
        values = m.weight.detach().reshape(-1)[idx] - base  # (t,)
        if dense:
            delta = torch.zeros_like(m.weight, requires_grad=False)
            delta.view(-1)[idx] = values
            out[name] = delta
        else:
            out[f"{name}.indices"], out[f"{name}.values"] = idx.clone(), values.clone()
    return out


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Remove LIFT's hooks and restore each parameter's ``requires_grad``; the update is already in the
    weights (LIFT edits them in place), so this returns the same, now plain, module."""
    lift = _handle(model)
    lift.check_stepped("merge_and_unload")
    lift.optimizer.remove_hooks()
    for m in lift.targets.values():
        unmask_grad_linear(m)  # sparse_grad
    for n, p in model.named_parameters():
        p.requires_grad_(lift._requires_grad.get(n, True))
    _unignore_in_ddp(model)
    del model._weightlab_lift
    return model


register("method", "lift")(prepare)  # LIFT's entry: prepare(model, LiftConfig()) returns the Lift handle
