"""The one LightningDataModule: train split with a training augmentation, test split for validation,
and a train split with the evaluation transform for kNN feature banks.

The training loader's order and augmentation are pure functions of (seed, epoch, index) (:mod:`mimzoo.seeding`),
and the module's ``state_dict`` holds where training stands in its epoch, so a resume from a mid-epoch checkpoint
carries on with the very batches the uninterrupted run would have drawn."""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
import signal
import warnings

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from mimzoo.errors import ConfigError, DataError
from mimzoo.seeding import run_seed

from .datasets import build_dataset, num_classes_of
from .device import BatchViews, DeviceBatches, ResumableBatchSampler, load_uint8
from .sampling import ResumableDataLoader, ResumableSampler, SeededDataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, build_transform

LOADERS = ("pil", "device")
DEVICE_SCALES = {"mae": (0.2, 1.0), "linear": (0.08, 1.0)}  # RandomResizedCrop scales of the batched train_augs


def ignore_stop_signals(worker_id: int) -> None:
    """Loading workers leave SIGTERM and SIGUSR1 to the main process, which stops at a step boundary and shuts
    them down itself: a signal sent to every process of a job (as SLURM sends it) must not kill them first."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _stop_workers_at_exit() -> None:
    """Workers still alive when the interpreter exits (a loader nobody shut down) are stopped by multiprocessing's
    exit handler with SIGTERM, which they ignore, before it joins them: stop them with SIGKILL first (atexit runs
    this before that handler, registered earlier). Daemonic children never outlive the interpreter either way."""
    atexit.register(_kill_daemonic_children)


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
        loader: str = "pil",
        memory_limit_gb: float = 4.0,
        memory_image_size: int | None = None,
    ):
        super().__init__()
        if loader not in LOADERS:
            raise ConfigError(f"data.loader={loader!r} is not a loader; choose one of {', '.join(LOADERS)}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.train_views: dict | None = None  # set by methods that train on multi-crop views (iBOT)
        self._sets: dict = {}
        self._resume: tuple[int, int] | None = None  # (epoch, batches done in it) from a checkpoint
        self._in_memory: tuple | None = None  # data.loader=device: (images, labels) on the training device

    def _dataset(self, split: str):
        if split not in self._sets:
            h = self.hparams
            aug = h.train_aug if split == "train" else "eval"
            if split == "train" and self.train_views:
                tf = MultiCrop(h.image_size, mean=tuple(h.mean), std=tuple(h.std), **self.train_views)
            else:
                tf = build_transform(aug, h.image_size, tuple(h.mean), tuple(h.std), crop_pct=h.crop_pct)
            self._sets[split] = build_dataset(
                h.name,
                h.root,
                train=split != "val",
                transform=tf,
                image_size=h.image_size,
                download=h.download,
                fake_size=h.fake_size,
                num_classes=h.num_classes,
                bad_images=h.bad_images,
            )
        return self._sets[split]

    def prepare_data(self):
        # Runs on one process per node: check the files (and download them if allowed) before training.
        self._dataset("train")
        self._dataset("val")

    @property
    def num_classes(self) -> int:
        return num_classes_of(self._dataset("val"))

    def _loader(self, split: str, shuffle: bool, drop_last: bool, **kwargs):
        workers = self.hparams.num_workers
        dataset, loader = kwargs.pop("dataset", None), kwargs.pop("loader", DataLoader)
        if workers > 0:
            _stop_workers_at_exit()
        dataset = self._dataset(split) if dataset is None else dataset
        return loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self):
        """Shuffled by a :class:`ResumableSampler` (sharded over the trainer's ranks, started where a resumed
        checkpoint left off) over the training set wrapped in a :class:`SeededDataset`; with ``loader=device``,
        batches of the same samples augmented on the training device (:meth:`device_dataloader`)."""
        trainer, seed = self.trainer, run_seed()
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        epoch, batches = self._resume or (0, 0)
        if self.hparams.loader == "device":
            # Lightning suggests loading workers for a loader without them; this one augments on the training
            # device in the main process, so no worker setting applies
            warnings.filterwarnings("ignore", r"The 'train_dataloader' does not have many workers", PossibleUserWarning)
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            return self.device_dataloader(device, seed, world, rank, epoch, batches)
        sampler = ResumableSampler(
            self._dataset("train"),
            num_replicas=world,
            rank=rank,
            seed=seed,
            epoch=epoch,
            start=batches * self.batch_size,
        )
        self._check_batches(len(self._dataset("train")))
        return self._loader(
            "train",
            shuffle=False,
            drop_last=self.hparams.drop_last,
            sampler=sampler,
            dataset=SeededDataset(self._dataset("train"), seed),
            loader=ResumableDataLoader,
        )

    def device_dataloader(
        self, device: torch.device, seed: int, world: int = 1, rank: int = 0, epoch: int = 0, batches: int = 0
    ) -> ResumableDataLoader:
        """``loader=device``: the training split, read once as uint8 onto ``device``, and a loader (no workers,
        ``batch_size=None``) whose items are whole batches augmented there. The loader, not a batch-transfer hook,
        does the augmentation so that what it yields is the training batch itself: Lightning shards, counts and
        resumes it as any map-style loader (its sampler is a DistributedSampler), and benchmarks and tests use it
        without a trainer. Only MAE's view (``train_aug`` mae or linear) or a method's multi-crop are batched."""
        h = self.hparams
        if not self.train_views and h.train_aug not in DEVICE_SCALES:
            raise ConfigError(
                f"data.loader=device augments batches for train_aug mae or linear, not "
                f"{h.train_aug!r}: set data.train_aug=mae or data.loader=pil"
            )
        if self._in_memory is None or self._in_memory[0].device != device:
            images, labels = self._in_memory or load_uint8(
                build_dataset(
                    h.name,
                    h.root,
                    train=True,
                    transform=None,
                    image_size=h.image_size,
                    download=h.download,
                    fake_size=h.fake_size,
                    num_classes=h.num_classes,
                    bad_images=h.bad_images,
                ),
                h.name,
                h.memory_image_size or h.image_size,
                h.memory_limit_gb,
                h.num_workers,
            )
            self._in_memory = images.to(device), labels.to(device)
        images, labels = self._in_memory
        self._check_batches(len(images))
        views = BatchViews(
            h.image_size,
            h.mean,
            h.std,
            views=self.train_views,
            scale=DEVICE_SCALES.get(h.train_aug, DEVICE_SCALES["mae"]),
        )
        sampler = ResumableBatchSampler(
            images,
            self.batch_size,
            drop_last=h.drop_last,
            num_replicas=world,
            rank=rank,
            seed=seed,
            epoch=epoch,
            start=batches,
        )
        return ResumableDataLoader(DeviceBatches(images, labels, views, seed, rank), batch_size=None, sampler=sampler)

    def _check_batches(self, num_images: int) -> None:
        """A batch larger than a process's share of the training split leaves no batch (drop_last): refuse it
        instead of a run that ends at once without training or a checkpoint."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(num_images / world)
        if self.hparams.drop_last and per_process < self.batch_size:
            share = f" ({num_images} over {world} processes)" if world > 1 else ""
            raise DataError(
                f"data.batch_size={self.batch_size} is larger than the {per_process} training images of "
                f"{self.hparams.name}{share}, so no full batch is left: set data.batch_size={per_process} or less"
            )

    def state_dict(self) -> dict:
        """Where training stands: the epoch and the batches this process has trained on in it (a checkpoint
        saved at an epoch's end points at the next epoch's start)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        fit = trainer.fit_loop
        epoch = fit.epoch_progress.current.completed
        in_epoch = fit.epoch_progress.current.ready > epoch
        batches = fit.epoch_loop.batch_progress.current.processed if in_epoch else 0
        if batches >= trainer.num_training_batches:
            epoch, batches = epoch + 1, 0
        return {"train_position": {"epoch": int(epoch), "batches": int(batches)}}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get("train_position")
        self._resume = (position["epoch"], position["batches"]) if position else None

    def val_dataloader(self):
        return self._loader("val", shuffle=False, drop_last=False)

    def bank_dataloader(self):
        """Training images with the evaluation transform (the kNN memory bank)."""
        return self._loader("bank", shuffle=False, drop_last=False)
