"""Building blocks shared by the methods: ViT encoders, ConvMAE's ConvViT, MAE decoder, iBOT head,
position embeddings, patchify."""

from .pos_embed import sincos_pos_embed_2d
from .vit import MaskTokenViT, ViTEncoder, patchify, unpatchify
from .decoder import MAEDecoder
from .heads import IBOTHead
from .convvit import ConvMAEEncoder, ConvViT

__all__ = ["ConvMAEEncoder", "ConvViT", "IBOTHead", "MAEDecoder", "MaskTokenViT", "ViTEncoder", "patchify",
           "sincos_pos_embed_2d", "unpatchify"]
