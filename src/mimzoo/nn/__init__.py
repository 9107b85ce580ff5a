"""Building blocks shared by the methods: the masked-encoder interface and its ViT, BEiT and ConvMAE
encoders, MAE decoder, iBOT head, position embeddings, patchify."""

from .beit import BEiTEncoder
from .convvit import ConvMAEEncoder, ConvViT
from .decoder import MAEDecoder
from .heads import IBOTHead
from .masked_encoder import MaskedEncoder
from .pos_embed import sincos_pos_embed_2d
from .vit import MaskTokenViT, ViTEncoder, patchify, unpatchify

__all__ = [
    "BEiTEncoder",
    "ConvMAEEncoder",
    "ConvViT",
    "IBOTHead",
    "MAEDecoder",
    "MaskTokenViT",
    "MaskedEncoder",
    "ViTEncoder",
    "patchify",
    "sincos_pos_embed_2d",
    "unpatchify",
]
