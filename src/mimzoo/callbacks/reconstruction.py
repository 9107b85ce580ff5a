"""Picture callbacks (PNG files in the run directory and W&B images): the shared :class:`ImagePanels`
and the reconstruction panels (original | masked | reconstruction)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from mimzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from mimzoo.nn import unpatchify


def to_uint8(panel: torch.Tensor) -> np.ndarray:
    """A ``[3, H, W]`` float picture in [0, 1] -> ``[H, W, 3]`` uint8, rounded as torchvision's ``save_image``
    rounds: the pixels of the PNG file and of the W&B image alike."""
    return panel.detach().float().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def mask_to_pixels(mask: torch.Tensor, grid_size, patch_size: int) -> torch.Tensor:
    """Bool patch mask ``[B, L]`` -> pixel mask ``[B, 1, H, W]`` (1 where the patch is masked)."""
    ones = mask.float().unsqueeze(-1).expand(-1, -1, patch_size * patch_size)
    return unpatchify(ones, patch_size, grid_size, channels=1)


class ImagePanels(L.Callback):
    """Every ``every_n_epochs`` (and after the last epoch), render a picture of a fixed validation
    batch on rank 0, save it as ``out_dir/epoch_XXXX.png`` and send it to every logger that has
    ``log_image`` (W&B). Subclasses say which methods they apply to and how to render."""

    log_key, caption = "panel", ""

    def __init__(
        self,
        out_dir: str | None = None,
        num_images: int = 8,
        every_n_epochs: int = 1,
        seed: int = 0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        self.out_dir = Path(out_dir) if out_dir else None
        self.num_images, self.every_n_epochs, self.seed = num_images, every_n_epochs, seed
        self.mean, self.std = mean, std
        self.images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def applies(self, pl_module) -> bool:
        raise NotImplementedError

    def render(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.images is None and batch_idx == 0:
            self.images = batch[0][: self.num_images].detach().cpu()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if self.images is None or not self.applies(pl_module) or trainer.sanity_checking:
            return
        final_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if ((trainer.current_epoch + 1) % self.every_n_epochs and not final_epoch) or not trainer.is_global_zero:
            return
        # One uint8 picture for the file and the loggers: a float tensor handed to W&B is stored unscaled
        # (values 0..1 of 255, a black image).
        pixels = to_uint8(self.render(pl_module, self.images.to(pl_module.device)))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"epoch_{trainer.current_epoch:04d}.png"
        Image.fromarray(pixels).save(self.last_path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(self.log_key, [pixels], step=trainer.global_step, caption=[self.caption])


class ReconstructionPanels(ImagePanels):
    """Reconstruct a fixed validation batch with a fixed mask: ``reconstructions/epoch_XXXX.png`` in the
    run directory (rows: original, masked, reconstruction), for methods that reconstruct pixels."""

    log_key, caption = "reconstruction", "original | masked | reconstruction"

    def applies(self, pl_module) -> bool:
        return pl_module.reconstructs

    def render(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        masks = pl_module.uses_mask  # mask-free methods (the dVAE) get no masked row
        out = pl_module(images, mask=pl_module.draw_mask(images.shape[0], generator) if masks else None)
        recon = pl_module.reconstruct(images, out)
        pl_module.train(was_training)
        original = denormalize(images.float(), self.mean, self.std)
        rows = [original, denormalize(recon, self.mean, self.std)]
        if masks:
            pix = mask_to_pixels(out.mask, pl_module.grid_size, images.shape[-1] // pl_module.grid_size[1])
            rows.insert(1, original * (1 - pix) + 0.5 * pix)  # masked patches shown grey
        rows = torch.cat(rows)
        return make_grid(rows.cpu(), nrow=images.shape[0], padding=1, pad_value=1.0)
