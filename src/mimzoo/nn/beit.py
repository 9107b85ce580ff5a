"""BEiT's pre-training encoder: a timm ``Beit`` plus a learned mask token.

Subclassing timm's ``Beit`` (q/v bias without k bias, layer scale, shared relative position bias)
keeps the state dict a timm Beit's, so export is a copy minus ``mask_token`` (see
:meth:`BEiTEncoder.export_timm`). Follows microsoft/unilm ``beit/modeling_pretrain.py``.
"""

from __future__ import annotations

import math

import torch
from timm.models.beit import Beit
from torch import nn

from .masked_encoder import MaskedEncoder, state_for_export


def trunc_normal_1sigma_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """BEiT's truncated normal: cut at ±1 std (its code passes ``a=-std, b=std``), not timm's ±2."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)


class BEiTEncoder(MaskedEncoder, Beit):
    """timm Beit with ``mask_token``, a replacing :class:`~mimzoo.nn.MaskedEncoder` (BEiT, SimMIM).

    Defaults follow BEiT's pre-training code: no absolute positions, one relative position bias
    table shared by every layer, layer scale 0.1, the final norm on every token and ``[CLS]`` as the
    feature. ``use_rel_pos_bias`` gives every block its own table and ``global_pool="avg"`` moves the
    final norm after a mean over patch tokens (timm's ``fc_norm``): the layout of BEiT's fine-tuned
    weights (timm's ``beit_*``), so those load as they are.
    """

    drops_masked = False

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
        layer_scale_init: float | None = 0.1,
        use_abs_pos_emb: bool = False,
        use_shared_rel_pos_bias: bool = True,
        use_rel_pos_bias: bool = False,
        global_pool: str = "token",
    ):
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                "pick a patch size that divides it (e.g. model.encoder.patch_size=4 for 32px)"
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
            init_values=layer_scale_init or None,
            use_abs_pos_emb=use_abs_pos_emb,
            use_shared_rel_pos_bias=use_shared_rel_pos_bias,
            use_rel_pos_bias=use_rel_pos_bias,
            global_pool=global_pool,
        )
        if global_pool not in ("token", "avg"):
            raise ValueError(
                f"global_pool={global_pool!r}: use 'token' ([CLS], final norm on every token) or "
                "'avg' (mean of patch tokens, then fc_norm)"
            )
        super().__init__(**self.timm_kwargs, num_classes=0, qkv_bias=True, drop_path_rate=drop_path_rate)
        self.in_chans = in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.initialize_beit()

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def stride(self) -> int:
        return self.patch_embed.patch_size[0]

    @torch.no_grad()
    def initialize_beit(self):
        """BEiT's init: ±1σ truncated normal(0.02) for linears, conv, tokens and positions; LN (1, 0);
        relative position tables zero; then ``attn.proj``/``mlp.fc2`` of block l divided by sqrt(2l)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_1sigma_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_1sigma_(p)
        for layer, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, num_masked: int | None = None
    ) -> torch.Tensor:
        """Final-norm tokens ``[B, 1 + N, D]``; masked patch embeddings are replaced by ``mask_token``
        before positions are added.

        ``torch.where`` is BEiT's ``x*(1-w) + mask_token*w`` but also exact for non-finite pixels, so
        masked pixels cannot influence any output (not even through full attention).
        """
        x = self.patch_embed(images)
        if mask is not None:
            mask = self.check_mask(images, mask)
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """timm's pre-logits: ``[CLS]`` after the final norm, or with ``global_pool="avg"`` ``fc_norm`` of
        the mean patch token."""
        return self.forward_head(self.forward_masked(images), pre_logits=True)

    def export_timm(self, per_layer_rel_pos_bias: bool = True) -> tuple[dict, dict]:
        """``(kwargs, state_dict)`` for ``timm.create_model(**kwargs)`` (a plain timm Beit, strict load).

        With ``per_layer_rel_pos_bias`` (default, what BEiT's fine-tuning does and what timm's
        ``beit_*`` weights look like) the shared table is copied into every block's own table;
        otherwise the model keeps timm's ``use_shared_rel_pos_bias``. ``mask_token`` is dropped. A block
        with a table of its own as well gets the sum (the same index reads both).
        """
        kwargs = {"model_name": "beit_base_patch16_224", "pretrained": False, "num_classes": 0, **self.timm_kwargs}
        state = state_for_export(self, drop=("mask_token",))
        if per_layer_rel_pos_bias and self.rel_pos_bias is not None:
            table = state.pop("rel_pos_bias.relative_position_bias_table")
            for i in range(len(self.blocks)):
                own = f"blocks.{i}.attn.relative_position_bias_table"
                state[own] = table.clone() + state[own] if own in state else table.clone()
            kwargs.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
        return kwargs, state
