"""Self-guided mask pictures (original | Ncut object part | informed mask with hints | reconstruction)
as PNG files and W&B images, beside the reconstruction panels."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from mimzoo.data.transforms import denormalize

from .reconstruction import ImagePanels, mask_to_pixels


class InformedMaskPanels(ImagePanels):
    """Every ``every_n_epochs``, build the informed mask of a fixed validation batch with the current
    encoder and save ``informed_masks/epoch_XXXX.png`` (``out_dir`` defaults to the trainer's
    ``default_root_dir``, the run directory). Rows: original; the object part tinted red; the informed
    mask (grey) with hint patches tinted green; the reconstruction from that mask. SG-MAE's own callback
    (its ``configure_callbacks`` adds it); drawn in phase A too, to show what the switch would mask.

    A sibling of :class:`ReconstructionPanels`, not a subclass: ``configure_callbacks`` would let a
    subclass replace them."""

    log_key, caption = "informed_mask", "original | Ncut object part | informed mask (hints green) | reconstruction"

    def setup(self, trainer, pl_module, stage):
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir) / "informed_masks"

    def applies(self, pl_module) -> bool:
        return True  # attached only by the method that defines ``informed_mask``

    def render(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        informed = pl_module.informed_mask(images, torch.Generator().manual_seed(self.seed))
        was_training = pl_module.training
        pl_module.eval()
        recon = pl_module.reconstruct(images, pl_module(images, mask=informed.mask))
        pl_module.train(was_training)
        grid = pl_module.grid_size
        patch = images.shape[-1] // grid[1]
        original = denormalize(images.float(), self.mean, self.std)
        obj, masked, hints = (
            mask_to_pixels(m, grid, patch) for m in (informed.object_part, informed.mask, informed.hints)
        )
        red = original.new_tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        green = original.new_tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        tinted = original * (1 - 0.5 * obj) + 0.5 * obj * red
        masked_row = original * (1 - masked) + 0.5 * masked
        masked_row = masked_row * (1 - 0.5 * hints) + 0.5 * hints * green
        rows = torch.cat([original, tinted, masked_row, denormalize(recon, self.mean, self.std)])
        return make_grid(rows.cpu(), nrow=images.shape[0], padding=1, pad_value=1.0)
