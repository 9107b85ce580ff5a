"""Lightning logs training metrics every ``trainer.log_every_n_steps`` batches and warns when an epoch holds
fewer: :class:`LogIntervalFit` lowers the interval to the epoch's length instead."""

from __future__ import annotations

import math

import lightning as L


class LogIntervalFit(L.Callback):
    """Before fitting, lower ``trainer.log_every_n_steps`` to the training batches of one epoch when an epoch is
    shorter (a small data set, ``limit_train_batches``), so a short run still logs ``train/*`` rows and Lightning
    has nothing to warn about; the configured interval holds otherwise."""

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or trainer.datamodule is None or not trainer.log_every_n_steps:
            return
        loader = trainer.datamodule.train_dataloader()
        per_process = math.ceil(len(loader.dataset) / trainer.world_size)
        size = loader.batch_size or 1
        batches = per_process // size if loader.drop_last else math.ceil(per_process / size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None:
            batches = int(batches * limit)
        if 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = batches
