"""BN-adapt and Tent: test-time adaptation through normalisation layers (the baselines of paper key ``cotta``;
Tent: Wang et al., ICLR'21; BN-adapt: Schneider et al., NeurIPS'20), as the CoTTA code runs them
(``cifar/tent.py``, ``cifar/norm.py``).

* :class:`BNAdapt` — BatchNorm normalises with the statistics of the current test batch; no weight changes.
* :class:`Tent` — BatchNorm on batch statistics, only the normalisation affine parameters train, on the mean
  entropy of the model's own predictions (one Adam step per batch by default); it predicts with the logits
  the loss uses (computed before the step).

A model without BatchNorm (a ViT, a ConvNeXt, a GroupNorm ResNet) adapts the affine parameters of its
LayerNorm and GroupNorm layers instead, as the ViT variants of Tent in EATA (Niu et al., ICML'22) and SAR
(Niu et al., ICLR'23) do; those layers already normalise each sample with its own statistics, so BN-adapt
leaves such a model unchanged. On a model with BatchNorm the behaviour is the reference code's.

Both wrap a model: ``forward(x)`` adapts and returns logits, ``reset()`` goes back to the source model.

    model = Tent(source_model, TentConfig(lr=1e-3))
    for x in stream: logits = model(x)
"""

from __future__ import annotations

import abc
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from weightlab.errors import WeightlabError
from weightlab.registry import register

NormLayers = Literal["auto", "batchnorm", "all"]
NORM_LAYERS = ("auto", "batchnorm", "all")
SAMPLE_NORMS = (nn.LayerNorm, nn.GroupNorm)
"""Normalisation layers with per-sample statistics whose affine parameters Tent adapts without BatchNorm."""


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` (1d, 2d, 3d)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def require_batchnorm(model: nn.Module, method: str) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model``; a :class:`WeightlabError` naming the model if it has none."""
    layers = batchnorm_layers(model)
    if not layers:
        raise WeightlabError(f"{method} adapts BatchNorm layers, but the model {type(model).__name__} has "
                             "none (expected at least one nn.BatchNorm1d/2d/3d, e.g. SmallCNN with "
                             "batchnorm=True)")
    return layers


def adapted_norms(model: nn.Module, norm_layers: NormLayers = "auto", *, method: str = "Tent") -> list[nn.Module]:
    """The normalisation layers whose affine parameters Tent trains, in module order.

    Args:
        norm_layers: ``"auto"``: the BatchNorm layers, or the LayerNorm/GroupNorm layers when the model has
            no BatchNorm; ``"batchnorm"``: BatchNorm only (the reference); ``"all"``: all three kinds (SAR).

    Raises:
        WeightlabError: no layer of the chosen kinds, or an unknown ``norm_layers``.
    """
    if norm_layers not in NORM_LAYERS:
        raise WeightlabError(f"norm_layers must be one of {', '.join(NORM_LAYERS)}, got {norm_layers!r}")
    bn = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if norm_layers == "batchnorm":
        return bn or require_batchnorm(model, method)
    if bn and norm_layers == "auto":
        return bn
    layers = [m for m in model.modules() if isinstance(m, (_BatchNorm, *SAMPLE_NORMS))]
    if not layers:
        raise WeightlabError(f"{method} adapts normalisation layers, but the model {type(model).__name__} has "
                             "none (expected at least one nn.BatchNorm1d/2d/3d, nn.LayerNorm or nn.GroupNorm)")
    return layers


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer normalise with the current batch's statistics, in train and eval mode
    (``track_running_stats=False`` and no running buffers, as the reference code does). In place."""
    for bn in batchnorm_layers(model):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    return model


def configure_model(model: nn.Module, *, norm_layers: NormLayers = "auto") -> nn.Module:
    """Configure ``model`` in place for Tent: train mode, BatchNorm on batch statistics, and only the affine
    parameters of the :func:`adapted_norms` trainable. Raises :class:`WeightlabError` when the model has no
    normalisation layer of those kinds."""
    layers = adapted_norms(model, norm_layers)
    model.train()
    model.requires_grad_(False)
    use_batch_statistics(model)
    for layer in layers:
        layer.requires_grad_(True)
    return model


def collect_params(model: nn.Module, *, norm_layers: NormLayers = "auto") -> tuple[list[nn.Parameter], list[str]]:
    """The affine parameters (``weight``, ``bias``) of the :func:`adapted_norms` of ``model`` and their names."""
    chosen = {id(m) for m in adapted_norms(model, norm_layers)}
    params, names = [], []
    for module_name, module in model.named_modules():
        if id(module) in chosen:
            for pname, p in module.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    params.append(p)
                    names.append(f"{module_name}.{pname}" if module_name else pname)
    return params, names


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per sample: ``(B, classes)`` → ``(B,)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def make_tta_optimizer(params: list[nn.Parameter], *, optimizer: str, lr: float, momentum: float = 0.9,
                       nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                       weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (the CIFAR configs) or SGD with momentum (the ImageNet configs), as the reference builds them."""
    if not params:
        raise WeightlabError("test-time adaptation found no parameters to update")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@dataclass(frozen=True)
class TentConfig:
    """Tent's settings; defaults from CoTTA's ``cifar/cfgs/cifar10/tent.yaml`` (Adam 1e-3, 1 step).

    The ImageNet config uses ``optimizer="sgd", lr=0.00025, momentum=0.9``. ``norm_layers`` chooses the
    layers whose affine parameters train (see :func:`adapted_norms`; ``"auto"``: BatchNorm, or LayerNorm and
    GroupNorm in a model without BatchNorm).
    """

    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    steps: int = 1
    episodic: bool = False
    norm_layers: NormLayers = "auto"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise WeightlabError(f"Tent lr must be > 0, got {self.lr}")
        if self.norm_layers not in NORM_LAYERS:
            raise WeightlabError(f"Tent norm_layers must be one of {', '.join(NORM_LAYERS)}, "
                                 f"got {self.norm_layers!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise WeightlabError(f"Tent optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.steps < 1:
            raise WeightlabError(f"Tent steps must be ≥ 1, got {self.steps}")


class Adapter(nn.Module, metaclass=abc.ABCMeta):
    """What Tent and CoTTA share: ``forward`` resets first when ``config.episodic``, then runs
    ``config.steps`` calls of ``forward_and_adapt``; ``reset()`` reloads the saved source model and the
    optimiser state. Subclasses set ``config``, ``model``, ``optimizer`` and call :meth:`_save_source`."""

    config: Any  # a frozen config with `episodic` and `steps`
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def _save_source(self) -> None:
        self._model_state = copy.deepcopy(self.model.state_dict())
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    @abc.abstractmethod
    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """One adaptation step on the batch ``x``; returns the logits to predict with."""

    def forward(self, x: Tensor) -> Tensor:
        if self.config.episodic:
            self._reset_weights()
        for _ in range(self.config.steps):
            logits = self.forward_and_adapt(x)
        return logits

    def _reset_weights(self) -> None:
        """The source weights and a fresh optimiser state (what episodic mode does before every batch)."""
        self.model.load_state_dict(self._model_state, strict=True)
        self.optimizer.load_state_dict(self._optimizer_state)

    def reset(self) -> None:
        """Back to the source weights and a fresh optimiser state."""
        self._reset_weights()


@register("method", "tent")
class Tent(Adapter):
    """Tent: entropy minimisation on the normalisation affine parameters, one update per test batch.

    Args:
        model: a classifier with BatchNorm layers, or with LayerNorm/GroupNorm layers (a ViT: their affine
            parameters train, as in EATA and SAR); configured in place: keep your own copy if needed.
        config: the optimiser settings and which normalisation layers adapt.
    """

    def __init__(self, model: nn.Module, config: TentConfig = TentConfig()) -> None:
        super().__init__()
        self.config = config
        self.model = configure_model(model, norm_layers=config.norm_layers)
        params, self.param_names = collect_params(self.model, norm_layers=config.norm_layers)
        self.optimizer = make_tta_optimizer(params, optimizer=config.optimizer, lr=config.lr,
                                            momentum=config.momentum, betas=config.betas,
                                            weight_decay=config.weight_decay)
        self._save_source()

    @torch.enable_grad()
    def forward_and_adapt(self, x: Tensor) -> Tensor:
        """One step: logits ``(B, classes)`` of the current model, then an entropy step."""
        logits = self.model(x)
        loss = softmax_entropy(logits).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()


@register("method", "bn-adapt")
class BNAdapt(nn.Module):
    """BN-adapt ("Norm" in the CoTTA code): BatchNorm normalises with each test batch's statistics.

    No gradient step. ``momentum`` is the running-statistics momentum the reference keeps updating (the
    running statistics are not used for prediction). A model with only LayerNorm/GroupNorm layers already
    normalises each sample with its own statistics: BN-adapt is then the source model (with a warning).
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.1) -> None:
        super().__init__()
        layers = batchnorm_layers(model)
        if not layers:
            adapted_norms(model, "all", method="BN-adapt")  # refuses a model without any normalisation
            warnings.warn(f"{type(model).__name__} has no BatchNorm: its LayerNorm/GroupNorm layers use "
                          "per-sample statistics already, so BN-adapt returns the source model's predictions",
                          stacklevel=2)
        self.model = model
        for bn in layers:
            bn.momentum = momentum
        self._model_state = copy.deepcopy(model.state_dict())

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.model.eval()
        for bn in batchnorm_layers(self.model):
            bn.train()
        return self.model(x)

    def reset(self) -> None:
        self.model.load_state_dict(self._model_state, strict=True)
