"""MAE (He et al., 2022): encode visible patches only, decode all, regress masked pixels.

Follows facebookresearch/mae ``models_mae.py``: same init, same decoder, same (norm-pixel) loss on
masked patches only. The mask comes from the registry or is passed in.
"""

from __future__ import annotations

import torch

from mimzoo.masking import mask_to_ids
from mimzoo.nn import MAEDecoder, ViTEncoder, patchify, unpatchify

from .base import MIMMethod, MIMOutput


class MAE(MIMMethod):
    def __init__(
        self,
        encoder: dict,
        decoder: dict | None = None,
        mask: dict | None = None,
        optim: dict | None = None,
        norm_pix_loss: bool = True,
    ):
        super().__init__(mask=mask, optim=optim)
        self.save_hyperparameters()
        self.encoder = ViTEncoder(**encoder)
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.decoder = MAEDecoder(
            self.encoder.embed_dim, self.encoder.grid, self.patch_size, in_chans=encoder.get("in_chans", 3),
            **(decoder or {}),
        )
        self.norm_pix_loss = norm_pix_loss

    def encode(self, images, mask=None):
        """Final-norm tokens ``[B, 1 + visible, D]``; with a mask, masked patches never enter."""
        ids_keep = None if mask is None else mask_to_ids(self.resolve_mask(images, mask))[0]
        return self.encoder.forward_masked(images, ids_keep)

    def forward(self, images, mask=None):
        mask = self.resolve_mask(images, mask)
        ids_keep, ids_restore = mask_to_ids(mask)
        latent = self.encoder.forward_masked(images, ids_keep)
        pred = self.decoder(latent, ids_restore)
        return MIMOutput(loss=self.loss(images, pred, mask), mask=mask, pred=pred)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Patchified (already dataset-normalised) pixels; per-patch standardised with norm-pix loss."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, images, pred, mask):
        """Mean squared error per patch, averaged over masked patches only (fp32)."""
        per_patch = ((pred.float() - self.target(images)) ** 2).mean(-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum()

    def reconstruct(self, images: torch.Tensor, out: MIMOutput) -> torch.Tensor:
        """Image ``[B, C, H, W]`` (dataset-normalised) of visible patches + predictions for masked ones.

        With norm-pixel loss the predictions are standardised patches; they are mapped back with the
        ground-truth patch mean and std, as MAE's visualisation does.
        """
        patches = patchify(images.float(), self.patch_size)
        pred = out.pred.float()
        if self.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        mixed = torch.where(out.mask.unsqueeze(-1), pred, patches)
        return unpatchify(mixed, self.patch_size, self.grid_size, images.shape[1])
