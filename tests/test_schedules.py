"""Epoch-denominated schedules count real optimiser steps per epoch, and ``trainer.max_steps`` only stops a run
early: the schedules keep the length ``max_epochs`` real epochs give them, and the run says so once."""

import logging

import lightning as L
import pytest
import torch

from conftest import TINY_MAE
from mimzoo.data import MIMDataModule
from mimzoo.methods import MAE
from mimzoo.optim import schedule_steps, steps_per_epoch


class Record(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.per_epoch, self.total = steps_per_epoch(trainer), schedule_steps(trainer)
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def fit(batch_size=64, drop_last=True, optim=None, **trainer_kwargs) -> Record:
    torch.manual_seed(0)
    model = MAE(**TINY_MAE, optim={"lr": 1e-3, **(optim or {})})
    dm = MIMDataModule("cifar10-mini", batch_size=batch_size, num_workers=0, train_aug="none", drop_last=drop_last)
    record = Record()
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=dm)
    return record


# cifar10-mini has 512 training images
@pytest.mark.parametrize(
    "batch_size, drop_last, accumulate, limit, per_epoch",
    [
        (64, True, 1, 1.0, 8),
        (96, True, 1, 1.0, 5),
        (96, False, 1, 1.0, 6),
        (96, False, 4, 1.0, 2),
        (64, True, 3, 4, 2),
    ],
)
def test_steps_per_epoch_are_the_real_optimiser_steps(batch_size, drop_last, accumulate, limit, per_epoch):
    record = fit(
        batch_size, drop_last, max_epochs=7, max_steps=1, accumulate_grad_batches=accumulate, limit_train_batches=limit
    )
    assert record.per_epoch == per_epoch
    assert record.total == 7 * per_epoch  # max_steps=1 stops the run, it does not shorten the schedule


def test_max_steps_keeps_the_warmup_and_says_once_that_it_stops_early(caplog):
    """MAE's warm-up of 2 epochs of 8 steps lasts 16 steps whatever max_steps is; the run stops at step 5."""
    with caplog.at_level(logging.INFO):
        record = fit(max_epochs=10, max_steps=5, optim={"warmup_epochs": 2})
    assert record.scheduler.warmup_t == 16 and record.scheduler.t_initial == 80 - 16
    assert [step for step, _ in record.lrs] == [0, 1, 2, 3, 4]
    assert [lr for _, lr in record.lrs] == pytest.approx([1e-3 * step / 16 for step in range(5)])
    notes = [r.getMessage() for r in caplog.records if "stops this run early" in r.getMessage()]
    assert len(notes) == 1 and "at step 5 of the 80" in notes[0] and "8 steps per epoch" in notes[0]


def test_a_run_that_ends_with_its_epochs_says_nothing(caplog):
    with caplog.at_level(logging.INFO):
        record = fit(max_epochs=1, limit_train_batches=2)
    assert record.total == 2
    assert not [r for r in caplog.records if "stops this run early" in r.getMessage()]
