"""ConvMAE's hybrid convolution-transformer (Alpha-VL/ConvMAE ``vision_transformer.py``, ``models_convmae.py``).

Stages 1 and 2 are convolution blocks (depth-wise 5x5 conv in place of attention) at strides ``p1`` and
``p1*p2``; stage 3 is a plain ViT on the ``p1*p2*p3`` grid, without ``[CLS]``. Module names follow the
official code (``patch_embed1..4``, ``blocks1..3``, ``stage{1,2}_output_decode``), so official weights
load by a prefix rename. :class:`ConvViT` is the classifier (registered with timm as ``convmae_convvit``,
so fine-tuning builds it with ``timm.create_model``); :class:`ConvMAEEncoder` adds ConvMAE's masked
convolution, visible-token stage 3 and multi-scale fusion for pre-training.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import DropPath
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch import nn

from mimzoo.masking import mask_pyramid, mask_to_ids

from .masked_encoder import MaskedEncoder, state_for_export
from .pos_embed import sincos_pos_embed_2d
from .vit import init_linear_and_norm


def _channels_last_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvPatchEmbed(nn.Module):
    """Strided conv (kernel = stride = ``patch_size``), LayerNorm over channels, GELU (official ``PatchEmbed``).

    Each output position sees only its own ``patch_size`` square, so it never mixes patches."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # official: torch's default eps 1e-5 here and in CBlock
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(_channels_last_norm(self.norm, self.proj(x)))


class ConvMlp(nn.Module):
    """The MLP of a conv block as 1x1 convs (official ``CMlp``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """``x + conv2(DWConv5x5(visible * conv1(LN(x))))``, then ``x + MLP(LN(x))`` (official ``CBlock``).

    ``visible`` (``[B, 1, H, W]``, 1 = visible) is ConvMAE's masked convolution: the depth-wise conv is
    the only op that mixes positions, and its input is zero wherever the patch is masked."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_channels_last_norm(self.norm1, x))
        if visible is not None:
            h = h * visible.to(h.dtype)
        x = x + self.drop_path(self.conv2(self.attn(h)))
        return x + self.drop_path(self.mlp(_channels_last_norm(self.norm2, x)))


def _triple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3


class ConvViT(nn.Module):
    """ConvMAE's classifier (official ``models_convvit.ConvViT``), a timm-style model.

    ``global_pool``: ``"avg"`` averages the stage-3 tokens and applies a new ``fc_norm`` (the final
    ``norm`` is dropped, as ConvMAE/MAE fine-tuning does); ``"norm_avg"`` applies the pre-trained
    final ``norm`` and then averages (the pre-trained encoder's features, what ``export_timm`` uses).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size=(4, 2, 2),
        embed_dim=(256, 384, 768),
        depth=(2, 2, 11),
        num_heads: int = 12,
        mlp_ratio=(4.0, 4.0, 4.0),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        patch_size, embed_dim, depth, mlp_ratio = map(_triple, (patch_size, embed_dim, depth, mlp_ratio))
        stride = patch_size[0] * patch_size[1] * patch_size[2]
        if img_size % stride:
            raise ValueError(
                f"image size {img_size} is not divisible by the total stride {stride} of patch sizes "
                f"{list(patch_size)}; e.g. patch_size=[1,2,2] for 32px CIFAR, [4,2,2] for 224px"
            )
        if embed_dim[2] % num_heads:
            raise ValueError(f"stage-3 width {embed_dim[2]} is not divisible by num_heads {num_heads}")
        if global_pool not in ("avg", "norm_avg"):
            raise ValueError(f"global_pool must be 'avg' (fc_norm) or 'norm_avg' (final norm), got {global_pool!r}")
        self.img_size, self.patch_size, self.stride = img_size, patch_size, stride
        self.grid = (img_size // stride, img_size // stride)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.embed_dim = embed_dim[2]
        dims = (in_chans, *embed_dim)
        self.patch_embed1, self.patch_embed2, self.patch_embed3 = (
            ConvPatchEmbed(patch_size[i], dims[i], dims[i + 1]) for i in range(3)
        )
        self.patch_embed4 = nn.Linear(embed_dim[2], embed_dim[2])
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim[2], self.grid, cls_token=False))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depth)).tolist()  # stochastic depth over all stages
        self.blocks1 = nn.ModuleList([CBlock(embed_dim[0], mlp_ratio[0], dpr[i]) for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([CBlock(embed_dim[1], mlp_ratio[1], dpr[depth[0] + i]) for i in range(depth[1])])
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks3 = nn.Sequential(
            *[
                Block(
                    embed_dim[2],
                    num_heads,
                    mlp_ratio[2],
                    qkv_bias=True,
                    norm_layer=norm,
                    drop_path=dpr[depth[0] + depth[1] + i],
                )
                for i in range(depth[2])
            ]
        )
        fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if fc_norm else norm(embed_dim[2])
        self.fc_norm = norm(embed_dim[2]) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim[2], num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        """ConvMAE's init: xavier linears (and the stage-3 patch conv viewed as a linear), LN (1, 0);
        the other convs keep PyTorch's defaults; sin-cos positions."""
        self.apply(init_linear_and_norm)
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # --- timm model interface (fine-tuning, layer decay) ----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids as ConvMAE's ``lr_decay.py``: stems and conv stages 0, ``blocks3.k`` k + 1, the rest last."""
        return dict(
            stem=r"^pos_embed|^patch_embed|^blocks[12]\.",
            blocks=r"^blocks3\.(\d+)" if coarse else [(r"^blocks3\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError("changing global_pool changes the norms; build a new model instead")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward --------------------------------------------------------------------------------
    def forward_stages(self, images: torch.Tensor, visible: tuple | None = None):
        """``(stage-1 map, stage-2 map, stage-3 tokens [B, L, D] with positions, before blocks3)``.

        ``visible`` = (stage-1, stage-2) maps ``[B, 1, H_i, W_i]`` (1 = visible) for masked convolution."""
        v1, v2 = visible if visible is not None else (None, None)
        x = self.pos_drop(self.patch_embed1(images))
        for blk in self.blocks1:
            x = blk(x, v1)
        s1 = x
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, v2)
        s2 = x
        x = self.patch_embed4(self.patch_embed3(x).flatten(2).transpose(1, 2))
        return s1, s2, x + self.pos_embed

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Stage-3 tokens ``[B, L, D]`` after ``norm`` (identity under ``global_pool="avg"``)."""
        return self.norm(self.blocks3(self.forward_stages(images)[2]))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x.mean(1)))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@register_model
def convmae_convvit(pretrained: bool = False, **kwargs) -> ConvViT:
    """timm entry point; every size is a keyword (see ``ConvMAEEncoder.timm_kwargs``). No released weights."""
    if pretrained:
        raise ValueError("convmae_convvit has no timm weights; import official ones with `mimzoo-import convmae`")
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}  # the training preprocessing an export carries
    for key in ("pretrained_cfg", "cache_dir"):
        kwargs.pop(key, None)
    model = ConvViT(**kwargs)
    model.pretrained_cfg = model.default_cfg = {
        "num_classes": model.num_classes,
        "input_size": (3, model.img_size, model.img_size),
        "first_conv": "patch_embed1.proj",
        "classifier": "head",
        **overlay,
    }
    return model


class ConvMAEEncoder(MaskedEncoder, ConvViT):
    """The pre-training encoder, a dropping :class:`~mimzoo.nn.MaskedEncoder`: a :class:`ConvViT` (final
    ``norm``, no head) plus the multi-scale fusion convs, with frozen sin-cos positions.
    ``forward_masked`` is ConvMAE's ``forward_encoder``: the stage-3 mask, upsampled, zeroes the conv
    stages' depth-wise inputs at masked positions (masked convolution)."""

    drops_masked = True
    num_prefix_tokens = 0
    masked_conv: bool = True  # False only to show that leakage happens without it (tests)

    def __init__(
        self,
        img_size: int = 224,
        patch_size=(4, 2, 2),
        embed_dim=(256, 384, 768),
        depth=(2, 2, 11),
        num_heads: int = 12,
        mlp_ratio=(4.0, 4.0, 4.0),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
    ):
        # plain lists: the kwargs go into checkpoints' hyper-parameters and mimzoo-export's JSON
        patch_size, embed_dim, depth = ([int(v) for v in _triple(x)] for x in (patch_size, embed_dim, depth))
        mlp_ratio = [float(v) for v in _triple(mlp_ratio)]
        self.timm_kwargs = dict(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            in_chans=in_chans,
        )
        super().__init__(**self.timm_kwargs, num_classes=0, global_pool="norm_avg", drop_path_rate=drop_path_rate)
        self.in_chans = in_chans
        s2, s3 = patch_size[1] * patch_size[2], patch_size[2]  # from stage 1 / stage 2 to the stage-3 grid
        self.stage1_output_decode = nn.Conv2d(embed_dim[0], embed_dim[2], s2, stride=s2)
        self.stage2_output_decode = nn.Conv2d(embed_dim[1], embed_dim[2], s3, stride=s3)
        self.pos_embed.requires_grad_(False)

    @property
    def stage_scales(self) -> tuple[int, int]:
        """How many times finer the stage-1 and stage-2 grids are than the stage-3 grid."""
        return self.patch_size[1] * self.patch_size[2], self.patch_size[2]

    def visible_maps(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stage-1 and stage-2 visibility ``[B, 1, H_i, W_i]`` (1 = visible) from the stage-3 mask."""
        if not self.masked_conv:
            return None
        return tuple((~m).unsqueeze(1).float() for m in mask_pyramid(mask, self.grid, self.stage_scales))

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, num_masked: int | None = None
    ) -> torch.Tensor:
        """Fused latent ``[B, K, D]``: stage-3 blocks on the visible tokens only, plus the stage-1 and
        stage-2 maps brought to the stage-3 grid by strided convs at the same positions, then ``norm``."""
        ids_keep = visible = None
        if mask is not None:
            mask = self.check_mask(images, mask)
            ids_keep, visible = mask_to_ids(mask, num_masked)[0], self.visible_maps(mask)
        s1, s2, x = self.forward_stages(images, visible)
        s1 = self.stage1_output_decode(s1).flatten(2).transpose(1, 2)
        s2 = self.stage2_output_decode(s2).flatten(2).transpose(1, 2)
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x, s1, s2 = (torch.gather(t, 1, index) for t in (x, s1, s2))
        return self.norm(self.blocks3(x) + s1 + s2)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the final-norm stage-3 tokens, without the decoder-only fusion: exactly what the exported
        classifier computes, as ConvMAE's global-pool fine-tune/linear models."""
        return self.forward_features(images).mean(1)

    def export_timm(self) -> tuple[dict, dict]:
        """A :class:`ConvViT` (timm name ``convmae_convvit``, registered on ``import mimzoo.nn``) whose
        ``forward`` returns :meth:`features`; the fusion convs, used only to feed the decoder, are dropped
        (ConvMAE's fine-tuning model has none)."""
        kwargs = {
            "model_name": "convmae_convvit",
            "pretrained": False,
            "num_classes": 0,
            "global_pool": "norm_avg",
            **self.timm_kwargs,
        }
        return kwargs, state_for_export(self, drop=("stage1_output_decode.", "stage2_output_decode."))
