"""Building blocks shared by the methods: ViT encoder, MAE decoder, position embeddings, patchify."""

from .pos_embed import sincos_pos_embed_2d
from .vit import ViTEncoder, patchify, unpatchify
from .decoder import MAEDecoder
from .convvit import ConvMAEEncoder, ConvViT

__all__ = ["ConvMAEEncoder", "ConvViT", "MAEDecoder", "ViTEncoder", "patchify", "sincos_pos_embed_2d", "unpatchify"]
