"""Online probes: representation quality during pre-training, without a second job.

Both run on detached features of the *unmasked* images from the encoder in eval mode, so they
never change the pre-training gradients.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mimzoo.data import primary_view

from .knn import extract_features, knn_predict


class OnlineKNN(L.Callback):
    """Weighted kNN top-1 of the validation split against the training split, every ``every_n_epochs``."""

    def __init__(self, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1, max_bank: int | None = None):
        self.k, self.temperature, self.every_n_epochs, self.max_bank = k, temperature, every_n_epochs, max_bank

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        bank_loader = dm.bank_dataloader()
        if self.max_bank:
            bank_loader = _limit(bank_loader, self.max_bank)
        bank, bank_y = extract_features(pl_module, bank_loader, pl_module.device)
        queries_loader = dm.val_dataloader()
        if trainer.num_val_batches and trainer.num_val_batches[0] < len(queries_loader):  # limit_val_batches
            queries_loader = itertools.islice(queries_loader, int(trainer.num_val_batches[0]))
        queries, y = extract_features(pl_module, queries_loader, pl_module.device)
        pl_module.train(was_training)
        scores = knn_predict(bank, bank_y, queries, dm.num_classes, self.k, self.temperature)
        top1 = MulticlassAccuracy(dm.num_classes, average="micro")(scores, y)
        pl_module.log("probe/knn_top1", top1, rank_zero_only=True)


def _limit(loader, max_images: int):
    """The first ``max_images`` images of a loader (a bounded kNN bank for large data sets)."""
    seen = 0
    for images, y in loader:
        if seen >= max_images:
            return
        yield images[: max_images - seen], y[: max_images - seen]
        seen += images.shape[0]


class OnlineLinearProbe(L.Callback):
    """MAE-style linear head (BatchNorm without affine + Linear) trained on detached ``[CLS]``
    features of each training batch with its own optimiser; top-1 on the validation split."""

    def __init__(self, lr: float = 1e-3):
        self.lr = lr
        self.head: nn.Module | None = None
        self.accuracy: MulticlassAccuracy | None = None

    def setup(self, trainer, pl_module, stage):
        dim = pl_module.features(torch.zeros(2, 3, *pl_module.image_size, device=pl_module.device)).shape[-1]
        num_classes = trainer.datamodule.num_classes
        with torch.random.fork_rng():  # the head's init must not shift the pre-training random stream
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")

    def on_fit_start(self, trainer, pl_module):
        # Built in setup (so a resumed state can load), moved once the module is on its device.
        self.head.to(pl_module.device)
        self.accuracy.to(pl_module.device)
        self.optimizer.load_state_dict(self.optimizer.state_dict())  # re-casts restored state to that device

    def _features(self, pl_module, images):
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            feats = pl_module.features(images).float()
        pl_module.train(was_training)
        return feats

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images, y = primary_view(batch[0]), batch[1]
        self.head.train()
        with torch.enable_grad():
            loss = F.cross_entropy(self.head(self._features(pl_module, images)), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        pl_module.log("probe/linear_loss", loss.detach())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        self.head.eval()
        self.accuracy.update(self.head(self._features(pl_module, batch[0])), batch[1])

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        pl_module.log("probe/linear_top1", self.accuracy.compute(), sync_dist=True)
        self.accuracy.reset()

    def state_dict(self):
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()} if self.head else {}

    def load_state_dict(self, state):
        if state and self.head is not None:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
