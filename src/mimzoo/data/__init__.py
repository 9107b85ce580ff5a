"""Datasets, transforms and the LightningDataModule every run uses."""

from .datamodule import MIMDataModule
from .datasets import CIFAR, build_dataset
from .sampling import ResumableDataLoader, ResumableSampler, SeededDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, build_transform, primary_view

__all__ = [
    "CIFAR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIMDataModule",
    "MultiCrop",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeededDataset",
    "build_dataset",
    "build_transform",
    "primary_view",
]
