"""Randomness as a pure function of where training stands, so that a resumed run draws exactly what the
uninterrupted run drew, whatever the number of data-loading workers.

Every random draw of pre-training is seeded from the run's seed (``seed``, which ``seed_everything`` exports as
``PL_GLOBAL_SEED``), a stream and a position, instead of continuing a stream:

* data order: ``(seed, epoch)`` -> the epoch's permutation (:class:`mimzoo.data.ResumableSampler`, which can start
  at any batch of it);
* augmentation: ``(seed, epoch, sample index)`` -> torch, ``random`` and NumPy seeds before that sample's transform
  (:class:`mimzoo.data.SeededDataset`), in a worker or in the main process alike (where the states are restored
  after each batch); with ``data.loader=device``, ``(seed, epoch, batch index, rank)`` -> the generator a whole
  batch's augmentation is drawn from (:class:`mimzoo.data.device.DeviceBatches`);
* training masks: ``(seed, epoch, batch index, rank)`` -> the ``torch.Generator`` the method draws them from;
* the global torch RNG (dropout, drop-path, Gumbel noise): re-seeded from the same position before every batch.

So a checkpoint needs no RNG state, only the position, which Lightning's loop state and the data module's
``state_dict`` (epoch, batches done in it) hold.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import get_worker_info

_M64 = (1 << 64) - 1

# stream ids: one per kind of draw, so that equal positions of two streams give unrelated seeds
DATA_ORDER, AUGMENTATION, TRAIN_MASKS, TRAIN_GLOBAL, DEVICE_AUGMENTATION = 1, 2, 3, 4, 5


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run seed, a stream id, a position); any change of a part gives an
    unrelated seed. Pure Python, about a microsecond."""
    h = 0
    for part in parts:
        h = _mix(h ^ (int(part) & _M64))
    return h >> 1


def run_seed() -> int:
    """The run's seed as ``lightning.seed_everything`` exported it (0 when nothing was seeded)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global generators of the CPU and of ``device`` (``torch.manual_seed`` also queues a seed for
    every other CUDA device, about a millisecond a call)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ].manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


@contextmanager
def kept_rng_states():
    """Restore the CPU torch, ``random`` and NumPy states after the body, in the main process only (a loading
    worker's states are its own)."""
    if get_worker_info() is not None:
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def seed_host(seed: int) -> None:
    """Seed the CPU torch generator, ``random`` and NumPy (what augmentations draw from)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
