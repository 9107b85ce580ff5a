"""Linear probe (MAE ``main_linprobe.py``): a frozen encoder's ``[CLS]`` feature, a BatchNorm without
affine parameters and a linear layer trained with LARS (blr 0.1, warm-up + cosine per step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mimzoo.optim import StepScheduledModule, absolute_lr, warmup_cosine


class Classifier(StepScheduledModule):
    """What the trained protocols share: cross-entropy ``val/loss`` and micro top-1 ``val/top1``
    (torchmetrics, so it is exact across devices and batches)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")

    def validation_step(self, batch, batch_idx):
        images, y = batch[0], batch[1]
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits.float(), y), sync_dist=True)
        self.val_top1.update(logits, y)
        self.log("val/top1", self.val_top1, prog_bar=True)


class LinearProbe(Classifier):
    """``backbone`` is a pre-trained mimzoo method module; it stays frozen and in eval mode, and only
    the head is handed to the optimiser."""

    def __init__(self, backbone: nn.Module, num_classes: int, blr: float = 0.1, lr: float | None = None,
                 momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: float = 10, min_lr: float = 0.0):
        super().__init__(num_classes)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone.requires_grad_(False).eval()
        with torch.no_grad():
            dim = backbone.features(torch.zeros(2, 3, *backbone.image_size)).shape[-1]
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; the encoder must stay in eval mode
        (no drop-path, no dropout, fixed norms) so its features do not change during the probe."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone.features(images).float()
        return self.head(feats)

    def training_step(self, batch, batch_idx):
        images, y = batch[0], batch[1]
        loss = F.cross_entropy(self(images), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """LARS as in MAE: trust ratio (and weight decay) on the weight matrix only; biases plain SGD."""
        h = self.hparams
        self.trainer.estimated_stepping_batches  # loads the train loader the batch size may come from
        lr = absolute_lr(self.trainer, h.blr, h.lr)
        params = list(self.head.parameters())
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": h.weight_decay, "always_adapt": True},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
        ]
        optimizer = Lars(groups, lr=lr, momentum=h.momentum)
        scheduler = warmup_cosine(optimizer, self.trainer, h.warmup_epochs, h.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
