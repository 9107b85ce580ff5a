"""Self-guided mask pictures (original | Ncut object part | informed mask with hints | reconstruction)
as PNG files and W&B images, beside the reconstruction panels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from mimzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

from .reconstruction import mask_to_pixels


class InformedMaskPanels(L.Callback):
    """Every ``every_n_epochs``, build the informed mask of a fixed validation batch with the current
    encoder and save ``informed_masks/epoch_XXXX.png`` (``out_dir`` defaults to the trainer's
    ``default_root_dir``, the run directory). Rows: original; the object part tinted red; the informed
    mask (grey) with hint patches tinted green; the reconstruction from that mask. Needs a method with
    ``informed_mask`` (SG-MAE); drawn in phase A too, to show what the switch would mask.

    Not a subclass of :class:`ReconstructionPanels`: ``configure_callbacks`` would let it replace them."""

    def __init__(self, out_dir: str | None = None, num_images: int = 8, every_n_epochs: int = 1, seed: int = 0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.out_dir = Path(out_dir) if out_dir else None
        self.num_images, self.every_n_epochs, self.seed = num_images, every_n_epochs, seed
        self.mean, self.std = mean, std
        self.images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def setup(self, trainer, pl_module, stage):
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir) / "informed_masks"

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.images is None and batch_idx == 0:
            self.images = batch[0][: self.num_images].detach().cpu()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if self.images is None or not hasattr(pl_module, "informed_mask") or trainer.sanity_checking:
            return
        final_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if ((trainer.current_epoch + 1) % self.every_n_epochs and not final_epoch) or not trainer.is_global_zero:
            return
        panel = self.render(pl_module, self.images.to(pl_module.device))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"epoch_{trainer.current_epoch:04d}.png"
        save_image(panel, self.last_path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("informed_mask", [panel], step=trainer.global_step,
                                 caption=["original | Ncut object part | informed mask (hints green) | reconstruction"])

    def render(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        informed = pl_module.informed_mask(images, torch.Generator().manual_seed(self.seed))
        was_training = pl_module.training
        pl_module.eval()
        recon = pl_module.reconstruct(images, pl_module(images, mask=informed.mask))
        pl_module.train(was_training)
        grid = pl_module.grid_size
        patch = images.shape[-1] // grid[1]
        original = denormalize(images.float(), self.mean, self.std)
        obj, masked, hints = (mask_to_pixels(m, grid, patch)
                              for m in (informed.object_part, informed.mask, informed.hints))
        red = original.new_tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        green = original.new_tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        tinted = original * (1 - 0.5 * obj) + 0.5 * obj * red
        masked_row = original * (1 - masked) + 0.5 * masked
        masked_row = masked_row * (1 - 0.5 * hints) + 0.5 * hints * green
        rows = torch.cat([original, tinted, masked_row, denormalize(recon, self.mean, self.std)])
        return make_grid(rows.cpu(), nrow=images.shape[0], padding=1, pad_value=1.0)
