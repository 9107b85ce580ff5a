"""The ViT encoder every ViT method shares: a plain timm ``VisionTransformer`` that can skip tokens.

Being a timm model is the point: its state dict *is* a timm ViT's, so export is a copy and
official MAE/timm weights load without renaming.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimzoo.masking import mask_to_ids

from .masked_encoder import MaskedEncoder, state_for_export
from .pos_embed import sincos_pos_embed_2d


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, p*p*C]``, tokens row-major, values ordered (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Exact inverse of :func:`patchify`."""
    b = patches.shape[0]
    (gh, gw), p = grid_size, patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * p, gw * p)


class ViTEncoder(MaskedEncoder, VisionTransformer):
    """timm ViT with a ``[CLS]`` token, fixed sin-cos positions and MAE's initialisation; a dropping
    :class:`~mimzoo.nn.MaskedEncoder`: the blocks see the visible tokens only (MAE)."""

    drops_masked = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
    ):
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                f"pick a patch size that divides it (e.g. model.encoder.patch_size=4 for 32px CIFAR, 16 for 224px)"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.timm_kwargs = dict(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            in_chans=in_chans,
        )
        super().__init__(
            **self.timm_kwargs,
            num_classes=0,
            global_pool="token",
            class_token=True,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            dynamic_img_size=dynamic_img_size,
        )
        self.in_chans = in_chans
        self.pos_embed.requires_grad_(False)
        self.initialize_mae()

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def stride(self) -> int:
        return self.patch_embed.patch_size[0]

    def export_timm(self) -> tuple[dict, dict]:
        """A plain timm ``VisionTransformer`` (token pooling, no head); the architecture name only picks
        the class, the kwargs set every size. A mask token, if any, is not part of it."""
        kwargs = {
            "model_name": "vit_base_patch16_224",
            "pretrained": False,
            "num_classes": 0,
            "global_pool": "token",
            **self.timm_kwargs,
        }
        return kwargs, state_for_export(self, drop=("mask_token",))

    def initialize_mae(self):
        """MAE's init: frozen sin-cos positions, xavier patch/linears, normal(0.02) tokens."""
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid, cls_token=True))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, num_masked: int | None = None
    ) -> torch.Tensor:
        """Tokens ``[B, 1 + K, D]`` after the final norm, ``K`` visible patches in grid order."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        if mask is not None:
            ids_keep = mask_to_ids(self.check_mask(images, mask), num_masked)[0]
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.blocks(x)
        return self.norm(x)


class MaskTokenViT(ViTEncoder):
    """iBOT's ViT, a replacing :class:`~mimzoo.nn.MaskedEncoder`: a learned, zero-initialised ``mask_token``
    (iBOT's ``masked_embed``) replaces the patch embedding of masked patches before ``[CLS]`` and
    positions are added, and every token goes through the blocks. Learned positions (trunc-normal 0.02) are
    interpolated for crops of another size
    (multi-crop local views). Init as iBOT/DINO: trunc-normal(0.02) linears and tokens."""

    drops_masked = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs, dynamic_img_size=True)
        self.pos_embed.requires_grad_(True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_trunc_normal)
        self.patch_embed.proj.reset_parameters()  # iBOT leaves the patch conv at PyTorch's default

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, num_masked: int | None = None
    ) -> torch.Tensor:
        """Final-norm tokens ``[B, 1 + N, D]``; ``mask`` swaps the masked patches' embeddings for the mask
        token, so their pixels never enter. Crops of another size (local views) take no mask."""
        x = self.patch_embed(images)  # [B, h, w, D] (dynamic image size)
        if mask is not None:
            mask = self.check_mask(images, mask)
            b, h, w, d = x.shape
            x = torch.where(mask.view(b, h, w, 1), self.mask_token.to(x.dtype).view(1, 1, 1, d), x)
        x = self.blocks(self.norm_pre(self._pos_embed(x)))
        return self.norm(x)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[CLS]`` + patches, plus positions: the table itself at the model's grid, else resampled as
        iBOT's (DINO's) ``interpolate_pos_encoding`` does it, quirk included (:func:`interpolate_pos_encoding`)."""
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        return self.pos_drop(x + interpolate_pos_encoding(self.pos_embed, self.grid, (h, w)))


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``pos_embed [1, 1 + gh * gw, D]`` (``[CLS]`` first) for a ``size = (h, w)`` patch grid, computed as
    iBOT's / DINO's ``VisionTransformer.interpolate_pos_encoding``: bicubic ``F.interpolate`` with
    ``scale_factor=((h + 0.1) / gh, (w + 0.1) / gw)`` and ``recompute_scale_factor`` unset, so PyTorch
    samples at ``(i + 0.5) * gh / (h + 0.1) - 0.5``, not at the ``gh / h`` spacing of a resize to ``h``
    cells (timm's ``resample_abs_pos_embed``); the table itself at the model's own grid."""
    (gh, gw), (h, w) = grid, size
    if (h, w) == (gh, gw):
        return pos_embed
    d = pos_embed.shape[-1]
    patch = F.interpolate(
        pos_embed[:, 1:].reshape(1, gh, gw, d).permute(0, 3, 1, 2),
        scale_factor=((h + 0.1) / gh, (w + 0.1) / gw),
        mode="bicubic",
    )
    if patch.shape[-2:] != (h, w):
        raise RuntimeError(f"position interpolation gave a {tuple(patch.shape[-2:])} grid for {(h, w)}")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, d)], dim=1)


def _init_trunc_normal(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_linear_and_norm(m: nn.Module):
    """MAE/timm-style init: xavier-uniform linears with zero bias, LayerNorm to (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
