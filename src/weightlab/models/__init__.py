"""Model builders: small models for the embedded data, continual-learning heads, and ``pretrained(name)`` for
the pretrained networks that install offline (``weightlab.models.pretrained`` is a callable module)."""

from weightlab.models import pretrained
from weightlab.models.heads import ExpandableHead, MultiHead
from weightlab.models.small import MLP, CifarResNet, Classifier, SmallCNN, resnet18_cifar, resnet32_cifar
from weightlab.models.vit import TinyViT

__all__ = [
    "MLP", "CifarResNet", "Classifier", "ExpandableHead", "MultiHead", "SmallCNN", "TinyViT",
    "pretrained", "resnet18_cifar", "resnet32_cifar",
]
