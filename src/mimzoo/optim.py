"""Optimisation pieces every LightningModule shares (pre-training and evaluation alike):
``lr = blr * effective_batch / 256`` and MAE's per-step linear warm-up + half-cycle cosine."""

from __future__ import annotations

import math

import lightning as L
import torch
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


def steps_per_epoch(trainer: L.Trainer) -> float:
    """Optimiser steps in one epoch (for schedules configured in epochs)."""
    total = int(trainer.estimated_stepping_batches)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    if epochs:
        return total / epochs
    batches = trainer.num_training_batches  # inf before the loader is sized: count the run as one epoch
    return batches / trainer.accumulate_grad_batches if math.isfinite(batches) else max(total, 1)


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
    total = int(trainer.estimated_stepping_batches)
    warmup = min(int(round(warmup_epochs * steps_per_epoch(trainer))), max(total - 1, 0))
    scheduler = StepCosineScheduler(
        optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, warmup_t=warmup, warmup_lr_init=0.0,
        warmup_prefix=True, t_in_epochs=False,
    )
    return {"scheduler": scheduler, "interval": "step"}


def adamw_warmup_cosine(trainer: L.Trainer, param_groups, cfg: dict) -> dict:
    """Lightning optimiser config of every AdamW-trained module (pre-training, dVAE, fine-tuning):
    AdamW at ``absolute_lr`` with the per-step warm-up + cosine; weight decay comes with the groups.
    ``cfg`` holds blr, lr, betas, warmup_epochs and min_lr."""
    trainer.estimated_stepping_batches  # loads the train loader, which the batch size may come from
    lr = absolute_lr(trainer, cfg["blr"], cfg.get("lr"))
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg["betas"]))
    return {"optimizer": optimizer,
            "lr_scheduler": warmup_cosine(optimizer, trainer, cfg["warmup_epochs"], cfg["min_lr"])}


class StepScheduledModule(L.LightningModule):
    """Drives timm schedulers from Lightning, once per optimiser step."""

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(num_updates=self.global_step)
