"""Building blocks shared by the methods: ViT encoder, MAE decoder, position embeddings, patchify."""

from .pos_embed import sincos_pos_embed_2d
from .vit import MaskTokenViT, ViTEncoder, patchify, unpatchify
from .decoder import MAEDecoder
from .heads import IBOTHead

__all__ = ["IBOTHead", "MAEDecoder", "MaskTokenViT", "ViTEncoder", "patchify", "sincos_pos_embed_2d", "unpatchify"]
