"""Data: the embedded digits, local real datasets, and continual-learning scenarios."""

from weightlab.data.arrays import ArrayDataset, Batch, concat, stratified_split
from weightlab.data.datasets import DatasetSpec, dataset_spec, load_dataset, register_dataset
from weightlab.data.digits import digits, random_affine, resize
from weightlab.data.local import load_cifar, load_cifar10c, load_image_folder, load_mnist
from weightlab.data.scenarios import (
    Experience,
    Stream,
    class_incremental,
    class_order,
    cumulative,
    domain_incremental,
    permute_pixels,
    rotate,
    task_incremental,
)

__all__ = [
    "ArrayDataset",
    "Batch",
    "DatasetSpec",
    "Experience",
    "Stream",
    "class_incremental",
    "class_order",
    "concat",
    "cumulative",
    "dataset_spec",
    "digits",
    "domain_incremental",
    "load_cifar",
    "load_cifar10c",
    "load_dataset",
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
