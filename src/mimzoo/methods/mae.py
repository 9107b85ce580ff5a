"""MAE (He et al., 2022): encode visible patches only, decode all, regress masked pixels.

Follows facebookresearch/mae ``models_mae.py``: same init, same decoder, same (norm-pixel) loss on
masked patches only. The mask comes from the registry or is passed in. Variants change the encoder
(:meth:`MAE.build_encoder`, ConvMAE) or the training mask (:meth:`~MIMMethod.sample_mask`, SG-MAE).
"""

from __future__ import annotations

import torch

from mimzoo.nn import MAEDecoder, MaskedEncoder, ViTEncoder, patchify, unpatchify

from .base import MIMMethod, MIMOutput


class MAE(MIMMethod):
    reconstructs = True

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
        self.encoder = self.build_encoder(encoder)
        self.require_exact_masks()
        self.decoder = MAEDecoder.for_encoder(self.encoder, **(decoder or {}))
        self.norm_pix_loss = norm_pix_loss

    def build_encoder(self, encoder: dict) -> MaskedEncoder:
        """A dropping encoder of these sizes (here a ViT); the decoder and loss adapt to its grid."""
        return ViTEncoder(**encoder)

    @property
    def patch_size(self) -> int:
        """Pixels per target patch: the encoder's stride."""
        return self.encoder.stride

    def forward(self, images, mask=None):
        """The encoder keeps ``L - k`` tokens. ``k`` of a drawn mask is the strategy's exact count
        (:meth:`drawn_count`), so nothing is read back from the device; a given mask's ``k`` is read from
        it, except under ``torch.compile``, where the drawn count is assumed (checked on the device) so
        the forward and loss stay one graph."""
        num_masked = self.drawn_count() if mask is None or torch.compiler.is_compiling() else None
        mask = self.resolve_mask(images, mask)
        pred = self.decoder(self.encoder.forward_masked(images, mask, num_masked), mask)
        return MIMOutput(loss=self.loss(images, pred, mask), mask=mask, pred=pred)

    def drawn_count(self) -> int | None:
        """Masked patches per image of the masks :meth:`sample_mask` draws, known without looking at them
        (None for a strategy that does not say: then the count is read from the mask)."""
        count = getattr(self.mask_strategy, "count", None)
        return count(self.grid_size) if count is not None else None

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
