"""Data: the embedded digits, real datasets that install offline, local folders, and continual-learning
scenarios (``docs/data.md``)."""

from weightlab.data.arrays import ArrayDataset, Batch, concat, stratified_split
from weightlab.data.datasets import (
    DatasetSpec,
    dataset_location,
    dataset_provenance,
    dataset_spec,
    load_dataset,
    register_dataset,
)
from weightlab.data.digits import digits, random_affine, resize
from weightlab.data.images import load_fashion_mnist, load_mnist5k
from weightlab.data.local import load_cifar, load_cifar10c, load_image_folder, load_mnist
from weightlab.data.scenarios import (
    Experience,
    Stream,
    class_incremental,
    class_order,
    cumulative,
    domain_incremental,
    per_class_subset,
    permute_pixels,
    rotate,
    task_incremental,
)
from weightlab.data.sources import MissingDataError, data_home
from weightlab.data.text import TextDataset, load_spam_assassin

__all__ = [
    "ArrayDataset",
    "Batch",
    "DatasetSpec",
    "Experience",
    "MissingDataError",
    "Stream",
    "TextDataset",
    "class_incremental",
    "class_order",
    "concat",
    "per_class_subset",
    "cumulative",
    "data_home",
    "dataset_location",
    "dataset_provenance",
    "dataset_spec",
    "digits",
    "domain_incremental",
    "load_cifar",
    "load_cifar10c",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_spam_assassin",
    "load_image_folder",
    "load_mnist",
    "permute_pixels",
    "random_affine",
    "register_dataset",
    "resize",
    "rotate",
    "stratified_split",
    "task_incremental",
]
