"""ConvMAE (Gao et al., NeurIPS 2022): MAE with a convolution-transformer encoder and masked convolution.

Follows Alpha-VL/ConvMAE ``models_convmae.py``: one mask on the stage-3 grid, upsampled for the conv
stages (their depth-wise convs see zeros at masked positions), stage 3 on visible tokens only, the
stage-1/2 maps fused into the visible tokens, then MAE's decoder (without ``[CLS]``) and MAE's
(norm-pixel) loss on masked patches, which this class inherits from :class:`MAE`.
"""

from __future__ import annotations

import torch

from mimzoo.masking import mask_pyramid, mask_to_ids
from mimzoo.nn import ConvMAEEncoder, MAEDecoder

from .base import MIMMethod, MIMOutput
from .mae import MAE


class ConvMAE(MAE):
    """``encoder``: :class:`~mimzoo.nn.ConvMAEEncoder` sizes; ``decoder``: :class:`~mimzoo.nn.MAEDecoder`
    sizes. Targets are patches of the total stride ``p1*p2*p3`` (16 for 224px ConvMAE-Base)."""

    masked_conv: bool = True  # False only to show that leakage happens without it (tests)

    def __init__(
        self,
        encoder: dict,
        decoder: dict | None = None,
        mask: dict | None = None,
        optim: dict | None = None,
        norm_pix_loss: bool = True,
    ):
        MIMMethod.__init__(self, mask=mask, optim=optim)  # MAE's own __init__ would build a ViT
        # explicit: Lightning finds the arguments by itself only in an __init__ that calls super()
        self.save_hyperparameters(dict(encoder=encoder, decoder=decoder, mask=mask, optim=optim,
                                       norm_pix_loss=norm_pix_loss))
        self.encoder = ConvMAEEncoder(**encoder)
        self.patch_size = self.encoder.stride
        self.decoder = MAEDecoder(self.encoder.embed_dim, self.encoder.grid, self.patch_size,
                                  in_chans=encoder.get("in_chans", 3), cls_token=False, **(decoder or {}))
        self.norm_pix_loss = norm_pix_loss

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.encoder.img_size,) * 2

    def visible_maps(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stage-1 and stage-2 visibility ``[B, 1, H_i, W_i]`` (1 = visible) from the stage-3 mask."""
        if not self.masked_conv:
            return None
        return tuple((~m).unsqueeze(1).float() for m in mask_pyramid(mask, self.grid_size, self.encoder.stage_scales))

    def encode(self, images, mask=None):
        """The fused, final-norm latent the decoder sees: ``[B, visible, D]`` (all ``L`` without a mask)."""
        if mask is None:
            return self.encoder.forward_masked(images)
        mask = self.resolve_mask(images, mask)
        return self.encoder.forward_masked(images, mask_to_ids(mask)[0], self.visible_maps(mask))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the final-norm stage-3 tokens, unmasked, without the decoder-only fusion: exactly what the
        exported classifier (``export_timm``) computes, as ConvMAE's global-pool fine-tune/linear models."""
        return self.encoder.forward_features(images).mean(1)

    def forward(self, images, mask=None):
        mask = self.resolve_mask(images, mask)
        ids_keep, ids_restore = mask_to_ids(mask)
        latent = self.encoder.forward_masked(images, ids_keep, self.visible_maps(mask))
        pred = self.decoder(latent, ids_restore)
        return MIMOutput(loss=self.loss(images, pred, mask), mask=mask, pred=pred)

    def export_timm(self) -> tuple[dict, dict]:
        """``timm.create_model(**kwargs)`` is a :class:`~mimzoo.nn.ConvViT` (registered as ``convmae_convvit``
        on ``import mimzoo.nn``) whose ``forward`` returns :meth:`features`; the fusion convs, used only
        to feed the decoder, are dropped (ConvMAE's fine-tuning model has none)."""
        kwargs = {"model_name": "convmae_convvit", "pretrained": False, "num_classes": 0, "global_pool": "norm_avg",
                  **self.encoder.timm_kwargs}
        state = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()
                 if not k.startswith(("stage1_output_decode.", "stage2_output_decode."))}
        return kwargs, state
