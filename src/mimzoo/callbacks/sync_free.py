"""The progress bar and the throughput log without a host sync per step.

Lightning's progress bar reads the logged metrics (``.item()`` of the loss) at every refresh, and its
``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` after every training batch to read the clock: on a GPU
each waits for the queue to drain. The loggers read the device anyway every ``trainer.log_every_n_steps`` steps,
so these two read it then, and nowhere between: the bar shows the values of the last logged step (its step
counter still moves every refresh), and samples per second are measured over whole log intervals.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage


def logs_this_step(trainer) -> bool:
    """Whether the loggers write at the training step now ending (Lightning's own test, as its monitor uses)."""
    return trainer._logger_connector.should_update_logs


def synchronize(device: torch.device) -> None:
    """Wait for the device's queue (a GPU's); the clock read after it times the work queued before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoggedStepsProgressBar(TQDMProgressBar):
    """Reads the logged metrics on the steps the loggers write, and shows those values until the next."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown: dict | None = None
        self._in_batch_end = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False

    def get_metrics(self, trainer, pl_module):
        if not self._in_batch_end or self._shown is None or logs_this_step(trainer):
            self._shown = super().get_metrics(trainer, pl_module)
        return self._shown


class LoggedThroughput(ThroughputMonitor):
    """Training throughput timed at the steps that log: batches and samples are counted on the host every step,
    the device is synchronised and the clock read only where the loggers write. ``window_size`` counts those
    points (2: the rate over the last log interval); the first interval starts at the start of training.
    Validation is timed as Lightning does."""

    def _start(self, trainer) -> None:
        super()._start(trainer)
        if trainer.state.stage == RunningStage.TRAINING:
            self._throughputs[RunningStage.TRAINING].update(time=0.0, batches=0, samples=0)

    @torch.inference_mode()
    def _update(self, trainer, pl_module, batch, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or self.length_fn is not None:
            return super()._update(trainer, pl_module, batch, iter_num)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        if not logs_this_step(trainer):
            return
        synchronize(trainer.strategy.root_device)
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage], samples=self._samples[stage]
        )
