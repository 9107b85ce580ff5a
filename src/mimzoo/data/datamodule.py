"""The one LightningDataModule: train split with a training augmentation, test split for validation,
and a train split with the evaluation transform for kNN feature banks."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from mimzoo.errors import DataError

from .datasets import build_dataset, num_classes_of
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, build_transform


class MIMDataModule(L.LightningDataModule):
    """``patch_size`` is not used here: it is the default patch size of models at this resolution,
    which model configs read as ``${data.patch_size}``."""

    def __init__(
        self,
        name: str = "cifar10",
        root: str | None = None,
        image_size: int = 32,
        patch_size: int | None = None,
        batch_size: int = 256,
        num_workers: int = 2,
        train_aug: str = "mae",
        crop_pct: float = 1.0,
        mean: tuple = IMAGENET_MEAN,
        std: tuple = IMAGENET_STD,
        download: bool = False,
        fake_size: int = 256,
        num_classes: int | None = None,
        drop_last: bool = True,
        bad_images: str = "skip",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.train_views: dict | None = None  # set by methods that train on multi-crop views (iBOT)
        self._sets: dict = {}

    def _dataset(self, split: str):
        if split not in self._sets:
            h = self.hparams
            aug = h.train_aug if split == "train" else "eval"
            if split == "train" and self.train_views:
                tf = MultiCrop(h.image_size, mean=tuple(h.mean), std=tuple(h.std), **self.train_views)
            else:
                tf = build_transform(aug, h.image_size, tuple(h.mean), tuple(h.std), crop_pct=h.crop_pct)
            self._sets[split] = build_dataset(h.name, h.root, train=split != "val", transform=tf,
                                              image_size=h.image_size, download=h.download,
                                              fake_size=h.fake_size, num_classes=h.num_classes,
                                              bad_images=h.bad_images)
        return self._sets[split]

    def prepare_data(self):
        # Runs on one process per node: check the files (and download them if allowed) before training.
        self._dataset("train")
        self._dataset("val")

    @property
    def num_classes(self) -> int:
        return num_classes_of(self._dataset("val"))

    def _loader(self, split: str, shuffle: bool, drop_last: bool):
        workers = self.hparams.num_workers
        return DataLoader(self._dataset(split), batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)

    def train_dataloader(self):
        loader = self._loader("train", shuffle=True, drop_last=self.hparams.drop_last)
        self._check_batches(len(loader.dataset))
        return loader

    def _check_batches(self, num_images: int) -> None:
        """A batch larger than a process's share of the training split leaves no batch (drop_last): refuse it
        instead of a run that ends at once without training or a checkpoint."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(num_images / world)
        if self.hparams.drop_last and per_process < self.batch_size:
            share = f" ({num_images} over {world} processes)" if world > 1 else ""
            raise DataError(
                f"data.batch_size={self.batch_size} is larger than the {per_process} training images of "
                f"{self.hparams.name}{share}, so no full batch is left: set data.batch_size={per_process} or less")

    def val_dataloader(self):
        return self._loader("val", shuffle=False, drop_last=False)

    def bank_dataloader(self):
        """Training images with the evaluation transform (the kNN memory bank)."""
        return self._loader("bank", shuffle=False, drop_last=False)
