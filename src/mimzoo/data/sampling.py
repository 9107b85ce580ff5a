"""The training order and augmentation as pure functions of (seed, epoch, index): exact mid-epoch resume with any
number of workers (see :mod:`mimzoo.seeding`)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mimzoo.seeding import AUGMENTATION, DATA_ORDER, derive_seed, kept_rng_states, seed_host


class ResumableSampler(DistributedSampler):
    """The training order: a permutation seeded from ``(seed, epoch)``, sharded over ``num_replicas`` ranks as
    :class:`~torch.utils.data.DistributedSampler` shards it (padded to equal shards), and started at sample
    ``start`` of this rank's shard (a resume at batch ``start / batch_size`` of epoch ``epoch``); later epochs
    start at 0. It yields ``(epoch, index)`` pairs, which :class:`SeededDataset` seeds each sample's augmentation
    from. A :class:`DistributedSampler`, so Lightning keeps it under DDP; its length is the full shard's, so the
    batch count of an epoch, and the schedules counted in it, do not change on resume."""

    def __init__(
        self,
        dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.epoch, self.start = epoch, start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resume's offset holds for its own epoch only
        self.epoch = epoch

    def __iter__(self):
        epoch, n = self.epoch, len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, DATA_ORDER, epoch))
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        padding = self.total_size - n
        indices += (indices * math.ceil(padding / max(n, 1)))[:padding]
        shard = indices[self.rank : self.total_size : self.num_replicas]
        return iter([(epoch, i) for i in shard[self.start :]])


class SeededDataset(Dataset):
    """A training data set whose item ``(epoch, index)`` runs the transform with torch, ``random`` and NumPy
    seeded from ``(seed, epoch, index)``: a sample's augmentation depends neither on the worker that loads it
    nor on what was loaded before. A plain index is passed through unseeded. In the main process
    (``num_workers=0``) the generators' states are restored after each batch (``__getitems__``)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def _get(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        epoch, index = item
        seed_host(derive_seed(self.seed, AUGMENTATION, epoch, index))
        return self.dataset[index]

    def __getitem__(self, item):
        with kept_rng_states():
            return self._get(item)

    def __getitems__(self, items: list) -> list:
        with kept_rng_states():
            return [self._get(item) for item in items]


class ResumableDataLoader(DataLoader):
    """The training loader, which Lightning counts as resumable (no "dataloader is not resumable" warning on a
    mid-epoch resume): its place in the epoch comes back through ``MIMDataModule.state_dict`` and the
    :class:`ResumableSampler`, so it has no state of its own."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
