"""Small models for the embedded data: an MLP, a BatchNorm CNN and CIFAR-style ResNets.

They follow timm's interface: ``forward_features(x)`` gives ``(B, num_features)`` features, ``head`` is the
classifier, and ``forward(x)`` (or ``forward(x, task_id)`` when the head is a :class:`MultiHead`) gives logits.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import Tensor, nn

from weightlab.models.heads import MultiHead


class Classifier(nn.Module, metaclass=abc.ABCMeta):
    """Features then a head; the head may be replaced (``ExpandableHead``, ``MultiHead``)."""

    num_features: int
    head: nn.Module

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, ...)`` inputs to ``(B, num_features)`` features."""

    def forward(self, x: Tensor, task_id: int | Tensor | None = None) -> Tensor:
        features = self.forward_features(x)
        if isinstance(self.head, MultiHead):
            if task_id is None:
                raise ValueError("this model has one head per task: call model(x, task_id)")
            return self.head(features, task_id)
        return self.head(features)


class MLP(Classifier):
    """Flatten, then ``hidden`` ReLU layers, then a linear head."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


class SmallCNN(Classifier):
    """Conv–BN–ReLU blocks (``width``, ``2·width``), each followed by 2×2 max-pooling, then global average
    pooling and a linear head. BatchNorm makes it the fixture for test-time adaptation."""

    def __init__(self, num_classes: int, *, in_channels: int = 1, width: int = 32, batchnorm: bool = True) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm: nn.Module = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm), norm, nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 2 * width
        self.head = nn.Linear(2 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Classifier):
    """CIFAR-style ResNet: a 3×3 stem and stages of basic blocks (ResNet-18: 4 stages of 2 blocks, widths
    64–512; ResNet-32: 3 stages of 5 blocks, widths 16–64)."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int, *, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(_BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


def resnet18_cifar(num_classes: int, *, in_channels: int = 3) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels=in_channels)


def resnet32_cifar(num_classes: int, *, in_channels: int = 3) -> CifarResNet:
    return CifarResNet((5, 5, 5), (16, 32, 64), num_classes, in_channels=in_channels)
