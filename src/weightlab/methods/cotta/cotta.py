"""CoTTA: continual test-time adaptation (paper key ``cotta``; Wang, Fink, Van Gool, Dai, CVPR'22), as
``qinenergy/cotta:cifar/cotta.py`` runs it.

Per test batch ``x``: the student predicts ``s = student(x)``; the frozen anchor (the source weights,
BatchNorm on batch statistics) gives its batch-mean confidence ``mean(max softmax(anchor(x)))``; if that is
below ``anchor_threshold`` the teacher's target is the mean of ``n_augmentations`` augmented teacher passes
(logits), else ``teacher(x)``. The student takes one step on the soft cross-entropy
``−Σ softmax(t)·log_softmax(s)`` (symmetric in the ImageNet variant); the teacher follows by EMA
``θ' ← m·θ' + (1 − m)·θ``; then every element of every weight and bias of the student is restored to the
source value with probability ``restore_prob``. The prediction is the teacher's target ``t``.

    model = CoTTA(source_model, CoTTAConfig())       # CIFAR settings; CoTTAConfig.imagenet() for ImageNet-C
    for x in stream: logits = model(x)               # adapts on every call
    model.reset()                                    # back to the source: student, teacher, anchor, optimiser

Speed without changing the numbers: teacher and anchor run without autograd; the augmented passes run only
when the anchor is not confident (the CIFAR code computes them on every batch and discards them;
``always_augment=True`` restores that cost); the augmentations sample only the crop they keep. Randomness
comes from per-step generators (``derive_seed(seed, step, ...)``), so skipping the augmentations does not
shift the random stream. ``augmentation="batched"`` runs the passes as one vmapped computation in which every
copy keeps its own BatchNorm statistics (the GPU form); ``"sequential"`` loops over them (the CPU form);
``"auto"`` picks batched on CUDA and sequential otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.cotta.tent import Adapter, make_tta_optimizer, use_batch_statistics
from weightlab.methods.cotta.transforms import augment, sample_params
from weightlab.registry import register
from weightlab.utils import derive_seed


@dataclass(frozen=True)
class CoTTAConfig:
    """CoTTA's hyperparameters; defaults from ``cifar/cfgs/cifar10/cotta.yaml`` (CIFAR-10-C).

    Attributes:
        lr, optimizer, betas, momentum, nesterov, weight_decay: the student's optimiser (Adam 1e-3 on CIFAR).
        ema_momentum: teacher EMA momentum ``MT`` (0.999).
        restore_prob: stochastic-restore probability ``RST`` per element (0.01; ImageNet code 0.001).
        anchor_threshold: ``AP``, the batch-mean anchor confidence below which the augmented teacher is used
            (0.92 for CIFAR-10; 0.72 CIFAR-100; 0.1 ImageNet). The maintainer's rule: the 5% quantile of the
            source model's max-softmax on source data, minus 0.05 (see :func:`anchor_threshold_rule`).
        n_augmentations: augmented teacher passes (32).
        symmetric_loss: the ImageNet variant's ``−½Σ t̂ log ŝ − ½Σ ŝ log t̂`` instead of ``−Σ t̂ log ŝ``.
        always_augment: compute the augmented passes on every batch as the CIFAR code does (pure cost: the
            output is the same).
        soft_augment, noise_std, flip_prob: the augmentation ranges (``soft=False``, σ 0.005 and horizontal
            flips with probability 0.5 in the reference; set ``flip_prob=0`` for digits or text).
        augmentation, augment_chunk: how the passes run (see the module docstring) and how many copies one
            batched computation holds (memory bound).
        channels_last: run teacher and anchor (no autograd) in the channels-last layout, about 1.6× faster
            on a CPU for convolutions, pooling and BatchNorm. Off by default: logits change by ~1e-6 per
            pass, and over a long adapting stream that drift flips a few predictions relative to the
            reference loop (with it off, weightlab's CoTTA reproduces the reference bit for bit).
        steps, episodic: updates per batch (1); reset before every batch (False: continual).
        seed: seed of the augmentations and the restore masks.
    """

    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    ema_momentum: float = 0.999
    restore_prob: float = 0.01
    anchor_threshold: float = 0.92
    n_augmentations: int = 32
    symmetric_loss: bool = False
    always_augment: bool = False
    soft_augment: bool = False
    noise_std: float = 0.005
    flip_prob: float = 0.5
    augmentation: Literal["auto", "sequential", "batched"] = "auto"
    augment_chunk: int = 32
    channels_last: bool = False
    steps: int = 1
    episodic: bool = False
    seed: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"),
            (0.0 <= self.ema_momentum <= 1.0, f"ema_momentum must be in [0, 1], got {self.ema_momentum}"),
            (0.0 <= self.restore_prob <= 1.0, f"restore_prob must be in [0, 1], got {self.restore_prob}"),
            (0.0 <= self.anchor_threshold <= 1.0,
             f"anchor_threshold must be in [0, 1], got {self.anchor_threshold}"),
            (self.n_augmentations >= 1, f"n_augmentations must be ≥ 1, got {self.n_augmentations}"),
            (self.augmentation in ("auto", "sequential", "batched"),
             f"augmentation must be auto, sequential or batched, got {self.augmentation!r}"),
            (self.augment_chunk >= 1, f"augment_chunk must be ≥ 1, got {self.augment_chunk}"),
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}"),
            (self.noise_std >= 0, f"noise_std must be ≥ 0, got {self.noise_std}"),
            (0.0 <= self.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
        ]
        for ok, message in checks:
            if not ok:
                raise WeightlabError(f"CoTTAConfig: {message}")

    @classmethod
    def imagenet(cls, **overrides: object) -> CoTTAConfig:
        """The ImageNet-C variant: SGD (lr 0.01, momentum 0.9, Nesterov), restore 0.001, anchor threshold
        0.1, symmetric cross-entropy, augmented passes only when needed."""
        base = cls(lr=0.01, optimizer="sgd", momentum=0.9, nesterov=True, restore_prob=0.001,
                   anchor_threshold=0.1, symmetric_loss=True)
        return dataclasses.replace(base, **overrides)


def configure_model(model: nn.Module) -> nn.Module:
    """Configure ``model`` in place for CoTTA: train mode, every parameter trainable, BatchNorm on batch
    statistics (in train and eval mode)."""
    model.train()
    model.requires_grad_(True)
    return use_batch_statistics(model)


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """Every parameter named ``weight`` or ``bias`` (of any module) that requires grad, and its name."""
    params, names = [], []
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("weight", "bias") and p.requires_grad:
            params.append(p)
            names.append(name)
    return params, names


def anchor_threshold_rule(source_confidences: Tensor, *, quantile: float = 0.05,
                          margin: float = 0.05) -> float:
    """The maintainer's choice of ``anchor_threshold``: the ``quantile`` of the source model's max-softmax on
    source data ``(N,)`` minus ``margin`` (qinenergy/cotta issue #16)."""
    return float(torch.quantile(source_confidences.float(), quantile)) - margin


def soft_cross_entropy(student: Tensor, teacher: Tensor, *, symmetric: bool = False) -> Tensor:
    """``−Σ softmax(teacher)·log_softmax(student)`` per sample ``(B,)``; ``symmetric``: the mean of both
    directions (the ImageNet code)."""
    loss = -(teacher.softmax(1) * student.log_softmax(1)).sum(1)
    if symmetric:
        loss = 0.5 * loss - 0.5 * (student.softmax(1) * teacher.log_softmax(1)).sum(1)
    return loss


def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """``t ← momentum·t + (1 − momentum)·s`` for every pair, in place (same rounding as the reference)."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - momentum))


@torch.no_grad()
def stochastic_restore_(params: list[Tensor], source: list[Tensor], prob: float, *,
                        generator: torch.Generator) -> None:
    """Reset each element of each tensor in ``params`` to ``source`` with probability ``prob``, in place."""
    if prob <= 0:
        return
    for p, p0 in zip(params, source, strict=True):
        mask = torch.rand(p.shape, generator=generator, device=generator.device).to(p.device) < prob
        p.copy_(torch.where(mask, p0.to(p.device), p))


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


class PairMaxPool2d(nn.Module):
    """2×2, stride-2 max pooling as two elementwise maxima of strided views (rows, then columns): the same
    numbers as ``nn.MaxPool2d(2)`` (a maximum rounds nothing; NaNs propagate as there), about 10× faster on a
    CPU than the NCHW pooling kernel, which also computes indices. Falls back to ``F.max_pool2d`` when a gradient is
    needed (its tie-breaking routes gradients)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return nn.functional.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]  # floor mode drops an odd last row / column
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])  # (..., h/2, w)
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])  # (..., h/2, w/2)


def use_inference_ops_(model: nn.Module) -> nn.Module:
    """For the no-autograd teacher and anchor copies, in place: every plain 2×2 stride-2 ``nn.MaxPool2d``
    becomes :class:`PairMaxPool2d` (same numbers; an in-place ReLU would be faster too, but is unsafe in a
    model that reuses a ReLU's input)."""
    for name, child in list(model.named_children()):
        if (isinstance(child, nn.MaxPool2d) and _pair(child.kernel_size) == (2, 2)
                and _pair(child.stride or child.kernel_size) == (2, 2) and _pair(child.padding) == (0, 0)
                and _pair(child.dilation) == (1, 1) and not child.ceil_mode and not child.return_indices):
            setattr(model, name, PairMaxPool2d())
        else:
            use_inference_ops_(child)
    return model


@register("method", "cotta")
class CoTTA(Adapter):
    """The CoTTA wrapper: ``forward(x)`` adapts on the batch and returns the teacher's logits.

    Args:
        model: the source classifier (configured in place: keep your own copy if you need it).
        config: the hyperparameters.
    """

    config: CoTTAConfig

    def __init__(self, model: nn.Module, config: CoTTAConfig = CoTTAConfig()) -> None:
        super().__init__()
        self.config = config
        self.model = configure_model(model)
        self.params, self.param_names = collect_params(self.model)
        self.optimizer = make_tta_optimizer(self.params, optimizer=config.optimizer, lr=config.lr,
                                            momentum=config.momentum, nesterov=config.nesterov,
                                            betas=config.betas, weight_decay=config.weight_decay)
        self._save_source()
        self.step_count = 0
        self.augmented_steps = 0
        self._copy_teacher_and_anchor()

    def _copy_teacher_and_anchor(self) -> None:
        self.teacher = use_inference_ops_(copy.deepcopy(self.model).requires_grad_(False))
        self.anchor = use_inference_ops_(copy.deepcopy(self.model).requires_grad_(False))
        if self.config.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.anchor.to(memory_format=torch.channels_last)
        state = self._model_state
        self._source = [state[name] for name in self.param_names]

    def reset(self) -> None:
        """Back to a new wrapper's state: the source student, a fresh optimiser, teacher and anchor re-created
        from the source, and the step counters at 0, so a reset model draws the same augmentations and
        restore masks as a new one."""
        self._reset_weights()
        self.step_count = 0
        self.augmented_steps = 0

    def _reset_weights(self) -> None:
        """Reload the source student and optimiser state and re-create teacher and anchor (the counters go on:
        episodic mode resets before every batch and still draws fresh augmentations, as the reference does)."""
        super()._reset_weights()
        self._copy_teacher_and_anchor()

    def _generator(self, purpose: str, device: torch.device) -> torch.Generator:
        seed = derive_seed(self.config.seed, self.step_count, purpose)
        return torch.Generator(device=device).manual_seed(seed)

    def _layout(self, x: Tensor) -> Tensor:
        if self.config.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _batched(self, device: torch.device) -> bool:
        mode = self.config.augmentation
        return mode == "batched" or (mode == "auto" and device.type == "cuda")

    @torch.no_grad()
    def augmented_teacher(self, x: Tensor, *, batched: bool | None = None) -> Tensor:
        """Mean teacher logits ``(B, classes)`` over ``n_augmentations`` augmented copies of ``x``."""
        cfg = self.config
        batched = self._batched(x.device) if batched is None else batched
        generator = self._generator("augment", x.device)
        params = sample_params(cfg.n_augmentations, tuple(x.shape), generator=generator,
                               soft=cfg.soft_augment, noise_std=cfg.noise_std, flip_prob=cfg.flip_prob,
                               device=x.device)
        if batched:
            outs = []
            for start in range(0, cfg.n_augmentations, cfg.augment_chunk):
                copies = augment(x, params.chunk(start, start + cfg.augment_chunk))  # (k, B, C, H, W)
                if len(copies) == 1:  # vmap over a single copy hits a slow fallback (channels-last)
                    outs.append(self.teacher(self._layout(copies[0])).unsqueeze(0))
                else:
                    outs.append(torch.func.vmap(self.teacher)(copies))  # (k, B, classes), BN per copy
            return torch.cat(outs).mean(0)
        outs = [self.teacher(self._layout(augment(x, params.select(i))[0]))
                for i in range(cfg.n_augmentations)]
        return torch.stack(outs).mean(0)

    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """One CoTTA step on ``x`` ``(B, C, H, W)``; returns the teacher's logits ``(B, classes)``."""
        cfg = self.config
        with torch.no_grad():
            fast_x = self._layout(x)
            confidence = self.anchor(fast_x).softmax(1).max(1).values.mean()
            confident = bool(confidence >= cfg.anchor_threshold)
            augmented = None
            if not confident or cfg.always_augment:
                augmented = self.augmented_teacher(x)
                self.augmented_steps += int(not confident)
            target = self.teacher(fast_x) if confident else augmented
        with torch.enable_grad():
            student = self.model(x)
            loss = soft_cross_entropy(student, target, symmetric=cfg.symmetric_loss).mean(0)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), cfg.ema_momentum)
            stochastic_restore_(self.params, self._source, cfg.restore_prob,
                                generator=self._generator("restore", x.device))
        self.step_count += 1
        return target
