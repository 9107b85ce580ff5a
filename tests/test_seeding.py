"""The pieces of exact resume, fast: data order, augmentation and the loader position as functions of (seed, epoch,
index); which checkpoint a requeued SLURM job resumes from. The end-to-end checks are tests/test_resume.py and
tests/test_preemption.py (slow tier)."""

import os
import random
import time

import numpy as np
import torch

from mimzoo.callbacks.preemption import requeued_ckpt_path
from mimzoo.data import MIMDataModule, ResumableSampler, SeededDataset
from mimzoo.seeding import derive_seed


def test_derived_seeds_differ_per_part_and_repeat():
    seeds = {derive_seed(0, s, e, i) for s in (1, 2) for e in range(3) for i in range(50)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(1, 1, 2) != derive_seed(0, 2, 1)


def test_sampler_order_is_a_function_of_seed_and_epoch_and_starts_anywhere():
    data = range(100)
    full = list(ResumableSampler(data, seed=3, epoch=2))
    assert sorted(i for _, i in full) == list(range(100)) and {e for e, _ in full} == {2}
    assert full == list(ResumableSampler(data, seed=3, epoch=2))  # no hidden stream
    assert full != list(ResumableSampler(data, seed=3, epoch=1)) != list(ResumableSampler(data, seed=4, epoch=2))
    resumed = ResumableSampler(data, seed=3, epoch=2, start=40)
    assert list(resumed) == full[40:] and len(resumed) == 100  # the epoch keeps its length (its batch count)
    resumed.set_epoch(2)
    assert list(resumed) == full[40:]  # Lightning sets the resumed epoch again before iterating
    resumed.set_epoch(3)
    assert len(list(resumed)) == 100  # the next epoch starts at its beginning
    shards = [list(ResumableSampler(range(101), num_replicas=4, rank=r, seed=0)) for r in range(4)]
    assert all(len(s) == 26 for s in shards) and {i for s in shards for _, i in s} == set(range(101))


def test_augmentation_depends_on_seed_epoch_and_index_only():
    dm = MIMDataModule("cifar10-mini", batch_size=8, num_workers=0)
    data = SeededDataset(dm._dataset("train"), seed=0)
    a = data[(1, 7)][0]
    torch.manual_seed(123), random.seed(4), np.random.seed(5)
    data[(0, 3)]
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    assert torch.equal(data.__getitems__([(0, 2), (1, 7)])[1][0], a)  # whatever was loaded before, in any batch
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # main process left alone
    assert np.array_equal(np.random.get_state()[1], state[2][1])
    assert not torch.equal(data[(2, 7)][0], a)  # another epoch, another crop


def test_loader_resumes_at_its_position_with_or_without_workers():
    def batches(workers, position=None, epoch=1):
        dm = MIMDataModule("cifar10-mini", batch_size=64, num_workers=workers, train_aug="mae")
        if position:
            dm.load_state_dict({"train_position": position})
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b for b, _ in loader]

    full = batches(0)
    assert len(full) == 8 and not torch.equal(full[0], batches(0, epoch=2)[0])
    tail = batches(2, {"epoch": 1, "batches": 5})
    assert len(tail) == 3 and all(torch.equal(a, b) for a, b in zip(tail, full[5:]))


def test_a_requeued_job_resumes_from_the_newest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_ckpt_path(None, tmp_path) is None and requeued_ckpt_path("last", tmp_path) == "last"
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert requeued_ckpt_path(None, tmp_path) is None  # a fresh job does not resume by itself
    assert requeued_ckpt_path("other.ckpt", tmp_path) == "other.ckpt"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_ckpt_path(None, tmp_path) == "last"
    hpc = tmp_path / "hpc_ckpt_2.ckpt"
    hpc.write_bytes(b"x")
    now = time.time()
    os.utime(last, (now - 10, now - 10))
    assert requeued_ckpt_path("last", tmp_path) == str(hpc)
    os.utime(last, (now + 10, now + 10))
    assert requeued_ckpt_path(None, tmp_path) == "last"


def test_without_a_trainer_there_is_no_position_to_save():
    dm = MIMDataModule("cifar10-mini", batch_size=64, num_workers=0)
    assert dm.state_dict() == {}
    dm.load_state_dict({})  # an older checkpoint: the loader starts at its epoch's beginning
    assert dm.train_dataloader().sampler.start == 0
