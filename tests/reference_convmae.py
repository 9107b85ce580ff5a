"""An independent functional ConvMAE (Alpha-VL/ConvMAE ``models_convmae.py`` semantics) on an
official-format state dict, in plain torch ops, to check our module against.

Nothing here uses mimzoo or timm. The transformer block, patchify and loss come from the equally
independent ``reference_mae``; the conv stages, the mask upsampling (the official repeat/permute
route, not mimzoo's), the fusion and the decoder without ``[CLS]`` are written out from the official
Alpha-VL/ConvMAE ``models_convmae.py`` and ``vision_transformer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_mae import _depth, _lin, block, loss

CONV_EPS = 1e-5  # the official PatchEmbed and CBlock use nn.LayerNorm(dim), torch's default eps


def _ln2d(x, sd, name, eps=CONV_EPS):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)
    return x.permute(0, 3, 1, 2)


def _conv(x, sd, name, **kw):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def patch_embed(x, sd, name):
    p = sd[f"{name}.proj.weight"].shape[-1]
    return F.gelu(_ln2d(_conv(x, sd, f"{name}.proj", stride=p), sd, f"{name}.norm"))


def cblock(x, sd, name, visible):
    h = _conv(_ln2d(x, sd, f"{name}.norm1"), sd, f"{name}.conv1")
    if visible is not None:
        h = h * visible
    x = x + _conv(_conv(h, sd, f"{name}.attn", padding=2, groups=h.shape[1]), sd, f"{name}.conv2")
    mlp = _conv(F.gelu(_conv(_ln2d(x, sd, f"{name}.norm2"), sd, f"{name}.mlp.fc1")), sd, f"{name}.mlp.fc2")
    return x + mlp


def upsample(mask, grid, s):
    """The official route: repeat each patch s*s times, reshape to (g, g, s, s), permute, flatten."""
    b = mask.shape[0]
    m = mask.reshape(b, grid, grid).unsqueeze(-1).repeat(1, 1, 1, s * s).reshape(b, grid, grid, s, s)
    return m.permute(0, 1, 3, 2, 4).reshape(b, grid * s, grid * s).unsqueeze(1)


def random_masking(noise, ratio):
    """Official ``random_masking``: ``(ids_keep, mask float 1=removed, ids_restore)``."""
    b, n = noise.shape
    keep = int(n * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def encoder(sd, images, heads, noise, ratio=0.75, masked_conv=True):
    """``(latent [B, K, D], mask, ids_restore, (stage-1 map, stage-2 map))`` as ``forward_encoder``."""
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    grid = int(round(mask.shape[1] ** 0.5))
    p2, p3 = sd["patch_embed2.proj.weight"].shape[-1], sd["patch_embed3.proj.weight"].shape[-1]
    v1 = 1 - upsample(mask, grid, p2 * p3) if masked_conv else None
    v2 = 1 - upsample(mask, grid, p3) if masked_conv else None
    x = patch_embed(images, sd, "patch_embed1")
    for i in range(_depth(sd, "blocks1.")):
        x = cblock(x, sd, f"blocks1.{i}", v1)
    s1_map = x
    stage1 = _conv(x, sd, "stage1_output_decode", stride=p2 * p3).flatten(2).transpose(1, 2)
    x = patch_embed(x, sd, "patch_embed2")
    for i in range(_depth(sd, "blocks2.")):
        x = cblock(x, sd, f"blocks2.{i}", v2)
    s2_map = x
    stage2 = _conv(x, sd, "stage2_output_decode", stride=p3).flatten(2).transpose(1, 2)
    x = patch_embed(x, sd, "patch_embed3").flatten(2).transpose(1, 2)
    x = _lin(x, sd, "patch_embed4") + sd["pos_embed"]
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    x, stage1, stage2 = (torch.gather(t, 1, index) for t in (x, stage1, stage2))
    for i in range(_depth(sd, "blocks3.")):
        x = block(x, sd, f"blocks3.{i}", heads)
    x = x + stage1 + stage2
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x, mask, ids_restore, (s1_map, s2_map)


def decoder(sd, latent, ids_restore, heads):
    """MAE's decoder with no ``[CLS]`` slot anywhere."""
    x = _lin(latent, sd, "decoder_embed")
    b, n = ids_restore.shape
    x = torch.cat([x, sd["mask_token"].expand(b, n - x.shape[1], -1)], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + sd["decoder_pos_embed"]
    for i in range(_depth(sd, "decoder_blocks.")):
        x = block(x, sd, f"decoder_blocks.{i}", heads)
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    return _lin(x, sd, "decoder_pred")


def forward(sd, images, noise, enc_heads, dec_heads, norm_pix_loss, ratio=0.75):
    """The official forward: ``(loss, pred, mask)``; targets are patches of the total stride."""
    latent, mask, ids_restore, _ = encoder(sd, images, enc_heads, noise, ratio)
    pred = decoder(sd, latent, ids_restore, dec_heads)
    stride = images.shape[-1] // int(round(mask.shape[1] ** 0.5))
    return loss(images, pred, mask, stride, norm_pix_loss), pred, mask
