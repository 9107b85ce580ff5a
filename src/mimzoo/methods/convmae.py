"""ConvMAE (Gao et al., NeurIPS 2022): MAE with a convolution-transformer encoder and masked convolution.

Follows Alpha-VL/ConvMAE ``models_convmae.py``: one mask on the stage-3 grid, upsampled for the conv
stages (their depth-wise convs see zeros at masked positions), stage 3 on visible tokens only, the
stage-1/2 maps fused into the visible tokens (all in :class:`~mimzoo.nn.ConvMAEEncoder`), then MAE's
decoder (without ``[CLS]``) and MAE's (norm-pixel) loss on masked patches, inherited from :class:`MAE`.
"""

from __future__ import annotations

from mimzoo.nn import ConvMAEEncoder

from .mae import MAE


class ConvMAE(MAE):
    """``encoder``: :class:`~mimzoo.nn.ConvMAEEncoder` sizes; ``decoder``: :class:`~mimzoo.nn.MAEDecoder`
    sizes. Targets are patches of the total stride ``p1*p2*p3`` (16 for 224px ConvMAE-Base)."""

    def build_encoder(self, encoder: dict) -> ConvMAEEncoder:
        return ConvMAEEncoder(**encoder)
