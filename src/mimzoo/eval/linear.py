"""Linear probe (MAE ``main_linprobe.py``): a frozen encoder's ``[CLS]`` feature, a BatchNorm without
affine parameters and a linear layer trained with LARS (blr 0.1, warm-up + cosine per step)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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


def state_digest(module: nn.Module) -> str:
    """sha256 of a state dict (names, dtypes, shapes, bytes): whether two modules hold the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LinearProbe(Classifier):
    """``backbone`` is a pre-trained mimzoo method module; it stays frozen and in eval mode, and only
    the head is handed to the optimiser.

    Its checkpoints hold the head, not a second copy of the frozen encoder: they name the pre-trained
    checkpoint (``backbone_ckpt``) and the digest of its weights instead. :meth:`from_checkpoint` rebuilds
    the probe from both files (and refuses a pre-trained checkpoint whose weights have changed since)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        blr: float = 0.1,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_epochs: float = 10,
        min_lr: float = 0.0,
        backbone_ckpt: str | None = None,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone.requires_grad_(False).eval()
        with torch.no_grad():
            dim = backbone.features(torch.zeros(2, 3, *backbone.image_size)).shape[-1]
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
        self._backbone_digest: str | None = None  # the encoder is frozen: computed once, at the first save

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen encoder's weights; keep where they come from and their digest."""
        if self._backbone_digest is None:
            self._backbone_digest = state_digest(self.backbone)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint["linear_probe"] = {
            "backbone_ckpt": self.hparams.backbone_ckpt,
            "backbone_sha256": self._backbone_digest,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A head-only checkpoint loads onto this probe's encoder (the one it was built with)."""
        state = checkpoint["state_dict"]
        if not any(k.startswith("backbone.") for k in state):
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})

    @classmethod
    def from_checkpoint(cls, path, backbone: nn.Module | str | Path | None = None, map_location="cpu") -> LinearProbe:
        """The probe of a checkpoint written while training it. The encoder comes from ``backbone`` (a module
        or a mimzoo checkpoint path), by default from the pre-trained checkpoint the probe was trained on; it
        must hold the same weights as then."""
        from mimzoo.checkpoints import load_pretrained

        ckpt = torch.load(path, map_location=map_location, weights_only=False)
        meta = ckpt.get("linear_probe") or {}
        source = backbone if backbone is not None else meta.get("backbone_ckpt")
        if source is None:
            raise ValueError(f"{path} names no pre-trained checkpoint; pass backbone=<mimzoo checkpoint or module>")
        module = source if isinstance(source, nn.Module) else load_pretrained(source, map_location=map_location)
        expected = meta.get("backbone_sha256")
        if expected and state_digest(module) != expected:
            raise ValueError(
                f"the encoder from {source} is not the one the probe {path} was trained on (its weights "
                "changed since: was that checkpoint overwritten by a longer run?); pass backbone= the "
                "pre-trained checkpoint the probe was trained on"
            )
        return cls.load_from_checkpoint(path, map_location=map_location, backbone=module)

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
        _ = self.trainer.estimated_stepping_batches  # loads the train loader the batch size may come from
        lr = absolute_lr(self.trainer, h.blr, h.lr)
        params = list(self.head.parameters())
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": h.weight_decay, "always_adapt": True},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
        ]
        optimizer = Lars(groups, lr=lr, momentum=h.momentum)
        scheduler = warmup_cosine(optimizer, self.trainer, h.warmup_epochs, h.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
