"""MAE's lightweight decoder: visible latents + mask tokens, un-shuffled, back to pixels."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimzoo.masking import restore_ids

from .masked_encoder import MaskedEncoder
from .pos_embed import sincos_pos_embed_2d
from .vit import init_linear_and_norm


class MAEDecoder(nn.Module):
    """``Linear(D -> Dd)``, mask tokens, fixed sin-cos positions, timm blocks, ``Linear(Dd -> p*p*C)``.

    ``cls_token=False`` is for encoders without ``[CLS]`` (ConvMAE): no leading slot in the latent or
    the position table."""

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        cls_token: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by decoder num_heads {num_heads}")
        self.cls_token = cls_token
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_parameter(
            "pos_embed", nn.Parameter(sincos_pos_embed_2d(dim, grid_size, cls_token=cls_token), requires_grad=False)
        )
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    @classmethod
    def for_encoder(cls, encoder: MaskedEncoder, **sizes) -> MAEDecoder:
        """The decoder that fits a dropping encoder's width, grid, stride, channels and prefix tokens."""
        return cls(
            encoder.embed_dim,
            encoder.grid,
            encoder.stride,
            in_chans=encoder.in_chans,
            cls_token=encoder.num_prefix_tokens > 0,
            **sizes,
        )

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``latent [B, 1+K, D]`` (CLS first, then the visible tokens in grid order, as a dropping encoder
        returns them; ``[B, K, D]`` without ``cls_token``) and the mask ``[B, L]`` -> ``[B, L, p*p*C]``."""
        ids_restore = restore_ids(mask)  # needs no count: nothing read back to the host
        x = self.embed(latent)
        b, num_patches = ids_restore.shape
        c = int(self.cls_token)
        masks = self.mask_token.expand(b, num_patches + c - x.shape[1], -1)
        patches = torch.cat([x[:, c:], masks], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :c], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, c:]
