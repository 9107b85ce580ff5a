"""Optimisation pieces every LightningModule shares (pre-training and evaluation alike):
``lr = blr * effective_batch / 256`` and MAE's per-step linear warm-up + half-cycle cosine."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from timm.scheduler import CosineLRScheduler


def effective_batch_size(trainer: L.Trainer) -> int:
    """Images per optimiser step across devices, nodes and gradient accumulation."""
    dm = trainer.datamodule
    per_device = getattr(dm, "batch_size", None) or trainer.train_dataloader.batch_size
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def absolute_lr(trainer: L.Trainer, blr: float, lr: float | None = None) -> float:
    """``lr`` when given, else the linear scaling rule ``blr * effective_batch / 256``."""
    return lr if lr else blr * effective_batch_size(trainer) / 256


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), the schedule of DINO/iBOT's
    teacher momentum and weight decay; constant ``end`` beyond ``total``."""
    progress = min(max(step, 0) / max(total, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimiser steps in one real epoch: the batches the train loader gives each process per epoch (data size,
    batch size, devices, ``drop_last``, ``limit_train_batches``) over ``accumulate_grad_batches``, rounded up as
    Lightning steps. Sizes the train loader when it is not loaded yet."""
    _ = trainer.estimated_stepping_batches  # loads the train loader (its length) when needed
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
    # a loader of unknown length (iterable data set): max_steps spread over max_epochs, or the run is one epoch
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    return max(math.ceil(trainer.max_steps / epochs), 1) if trainer.max_steps > 0 else 1


def schedule_steps(trainer: L.Trainer) -> int:
    """Optimiser steps every schedule (warm-up + cosine, weight decay, EMA momentum, temperatures) is laid out
    over: ``max_epochs`` real epochs. ``trainer.max_steps`` only stops a run early (see :func:`early_stop_note`);
    it sets the length only without an epoch limit (``max_epochs=-1``)."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return steps_per_epoch(trainer) * trainer.max_epochs
    return max(int(trainer.estimated_stepping_batches), 1)


def early_stop_note(trainer: L.Trainer) -> str | None:
    """A line saying that ``trainer.max_steps`` ends the run before its schedules end, or None."""
    total = schedule_steps(trainer)
    if not 0 < trainer.max_steps < total:
        return None
    return (
        f"trainer.max_steps={trainer.max_steps} stops this run early, at step {trainer.max_steps} of the {total} "
        f"its schedules are laid out over (trainer.max_epochs={trainer.max_epochs} x {steps_per_epoch(trainer)} "
        "steps per epoch); warm-up, cosine and the other epoch-denominated schedules keep their length"
    )


class StepCosineScheduler(CosineLRScheduler):
    """timm's warm-up + cosine with no checkpointed state: as in MAE's ``lr_sched``, the rate is a
    function of the step and the *current* config, so resuming with a larger ``max_epochs`` stretches
    the schedule instead of replaying the finished one."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


def warmup_cosine(optimizer, trainer: L.Trainer, warmup_epochs: float, min_lr: float = 0.0) -> dict:
    """Lightning scheduler config: linear warm-up from 0 over ``warmup_epochs``, then cosine to
    ``min_lr``, updated every optimiser step; honours per-group ``lr_scale`` (layer decay)."""
    total = schedule_steps(trainer)
    warmup = min(int(round(warmup_epochs * steps_per_epoch(trainer))), max(total - 1, 0))
    scheduler = StepCosineScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return {"scheduler": scheduler, "interval": "step"}


def adamw_warmup_cosine(trainer: L.Trainer, param_groups, cfg: dict) -> dict:
    """Lightning optimiser config of every AdamW-trained module (pre-training, dVAE, fine-tuning):
    AdamW at ``absolute_lr`` with the per-step warm-up + cosine; weight decay comes with the groups.
    ``cfg`` holds blr, lr, betas, warmup_epochs and min_lr."""
    _ = trainer.estimated_stepping_batches  # loads the train loader, which the batch size may come from
    lr = absolute_lr(trainer, cfg["blr"], cfg.get("lr"))
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg["betas"]))
    return {
        "optimizer": optimizer,
        "lr_scheduler": warmup_cosine(optimizer, trainer, cfg["warmup_epochs"], cfg["min_lr"]),
    }


class StepScheduledModule(L.LightningModule):
    """Drives timm schedulers from Lightning, once per optimiser step; says once when ``max_steps`` cuts the
    run short of its schedules."""

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(num_updates=self.global_step)

    def on_train_start(self):
        for config in self.trainer.lr_scheduler_configs:  # the rate of the coming step, also after a resume
            if hasattr(config.scheduler, "step_update"):
                config.scheduler.step_update(num_updates=self.global_step)
        note = early_stop_note(self.trainer)
        if note:
            rank_zero_info(f"mimzoo: {note}")
