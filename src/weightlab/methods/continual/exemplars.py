"""Exemplar memories for class-incremental learning: iCaRL herding and the nearest-mean-of-exemplars
classifier.

Paper keys: ``weight-aligning`` (which uses iCaRL's herding memory, as PyCIL runs it) and iCaRL
(Rebuffi et al., CVPR 2017) for the NME classifier.

* :func:`herding` picks exemplars one at a time so that their running mean stays closest to the class mean
  of the L2-normalised features (PyCIL ``models/base.py _construct_exemplar``).
* :class:`HerdingSelector` plugs herding into :class:`weightlab.methods.continual.replay.ReplayBuffer`.
* :func:`class_means` and :class:`NearestMeanClassifier` give iCaRL's NME prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.train.evaluate import predict


def herding(features: Tensor, m: int) -> Tensor:
    """iCaRL herding: indices of ``m`` exemplars of one class, in the order they were chosen.

    With ``φ`` the L2-normalised rows of ``features`` and ``μ`` their mean, step ``k`` (1-based) picks
    ``argmin_i ||μ − (S + φ_i) / k||`` over the not-yet-chosen ``i``, with ``S`` the sum of the chosen ``φ``.

    Args:
        features: ``(N, D)`` features of one class.
        m: exemplars to choose (at most ``N`` are returned).

    Returns:
        ``(min(m, N),)`` long indices into ``features``, best first.
    """
    if features.ndim != 2:
        raise WeightlabError(f"herding expects (N, D) features, got shape {tuple(features.shape)}")
    if m < 0:
        raise WeightlabError(f"herding needs m ≥ 0 exemplars, got {m}")
    phi = F.normalize(features.double(), dim=1)  # (N, D)
    mu = phi.mean(0)  # (D,)
    n = phi.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros_like(mu)  # S, (D,)
    order = []
    for k in range(1, min(m, n) + 1):
        dist = (mu - (running + phi) / k).norm(dim=1)  # (N,)
        dist[chosen] = float("inf")
        i = int(dist.argmin())
        order.append(i)
        chosen[i] = True
        running += phi[i]
    return torch.tensor(order, dtype=torch.long)


@torch.no_grad()
def extract_features(model: nn.Module, data: ArrayDataset, *, batch_size: int = 512) -> Tensor:
    """``model.forward_features`` on all of ``data`` in eval mode (mode restored): ``(N, D)`` on the CPU."""
    if not hasattr(model, "forward_features"):
        raise WeightlabError(
            f"{type(model).__name__} has no forward_features(x); exemplar methods need a "
            "weightlab.models.Classifier or a model exposing its features"
        )
    if len(data) == 0:
        return torch.zeros(0, getattr(model, "num_features", 0))
    return predict(model, data, batch_size=batch_size, forward=lambda m, b: m.forward_features(b.x))[0]


class HerdingSelector:
    """A :data:`weightlab.methods.continual.replay.Selector` that herds on the current features of ``model``.

    Usage: ``ReplayBuffer(2000, selector=HerdingSelector(model))``.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 512) -> None:
        self.model = model
        self.batch_size = batch_size

    def __call__(self, data: ArrayDataset, m: int) -> Tensor:
        return herding(extract_features(self.model, data, batch_size=self.batch_size), m)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """iCaRL class prototypes: the mean of the L2-normalised features of each class, normalised again.

    Args:
        features: ``(N, D)`` exemplar features.
        labels: ``(N,)`` their classes in ``0..num_classes-1``.

    Returns:
        ``(num_classes, D)`` unit-norm means (a zero row for a class without exemplars).
    """
    phi = F.normalize(features.float(), dim=1)  # (N, D)
    sums = torch.zeros(num_classes, phi.shape[1]).index_add_(0, labels.long(), phi)
    return F.normalize(sums, dim=1)


class NearestMeanClassifier(nn.Module):
    """iCaRL's nearest-mean-of-exemplars classifier: the logit of class ``c`` is ``−||φ(x)/|φ(x)| − μ_c||²``.

    Its argmax is the nearest class mean, so :func:`weightlab.train.evaluate.accuracy` works on it unchanged.
    """

    def __init__(self, model: nn.Module, means: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("means", means)

    @classmethod
    def from_memory(cls, model: nn.Module, memory: ArrayDataset, num_classes: int) -> NearestMeanClassifier:
        """Prototypes computed from the exemplars in ``memory`` with the current features of ``model``."""
        if len(memory) == 0:
            raise WeightlabError("the NME classifier needs a non-empty exemplar memory")
        device = next(model.parameters()).device
        return cls(model, class_means(extract_features(model, memory), memory.y, num_classes).to(device))

    def forward(self, x: Tensor) -> Tensor:  # (B, ...) -> (B, classes)
        phi = F.normalize(self.model.forward_features(x).float(), dim=1)  # (B, D)
        return -torch.cdist(phi, self.means).pow(2)
