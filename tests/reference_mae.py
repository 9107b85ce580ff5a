"""An independent functional MAE (facebookresearch/mae ``models_mae.py`` semantics) on an
official-format state dict, in plain torch ops, so our modules can be checked against it.

Nothing here uses mimzoo or timm: attention, MLP, masking and loss are written out from the official
facebookresearch/mae ``models_mae.py`` (and ``util/pos_embed.py`` for the position table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6  # LayerNorm eps of every MAE norm


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def block(x, sd, name, heads):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)) with exact GELU."""
    b, n, d = x.shape
    qkv = _lin(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn.qkv")
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, N, d_h]
    attn = torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1)
    x = x + _lin((attn @ v).transpose(1, 2).reshape(b, n, d), sd, f"{name}.attn.proj")
    h = _lin(F.gelu(_lin(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp.fc1")), sd, f"{name}.mlp.fc2")
    return x + h


def _depth(sd, prefix):
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def random_masking(x, noise, ratio):
    """Official per-sample shuffle: keep the ``int(L*(1-ratio))`` lowest-noise tokens."""
    b, n, d = x.shape
    keep = int(n * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return x, torch.gather(mask, 1, ids_restore), ids_restore, ids_keep


def encoder(sd, images, heads, noise=None, ratio=0.75):
    """Returns ``(latent [B, 1+K, D], mask [B, L] float 1=removed, ids_restore, ids_keep)``;
    ``noise=None`` keeps every token in grid order."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:]
    mask = ids_restore = ids_keep = None
    if noise is not None:
        x, mask, ids_restore, ids_keep = random_masking(x, noise, ratio)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(_depth(sd, "blocks.")):
        x = block(x, sd, f"blocks.{i}", heads)
    return _ln(x, sd, "norm"), mask, ids_restore, ids_keep


def decoder(sd, latent, ids_restore, heads):
    """Mask tokens appended after the visible tokens, un-shuffled, decoded to ``[B, L, p*p*C]``."""
    x = _lin(latent, sd, "decoder_embed")
    b, n = ids_restore.shape
    tokens = torch.cat([x[:, 1:], sd["mask_token"].expand(b, n + 1 - x.shape[1], -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], tokens], dim=1) + sd["decoder_pos_embed"]
    for i in range(_depth(sd, "decoder_blocks.")):
        x = block(x, sd, f"decoder_blocks.{i}", heads)
    return _lin(_ln(x, sd, "decoder_norm"), sd, "decoder_pred")[:, 1:]


def patchify(images, p):
    """Patches row-major, values (row, col, channel) inside a patch; a permute, not mimzoo's einsum."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def loss(images, pred, mask, p, norm_pix_loss):
    target = patchify(images, p)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def forward(sd, images, noise, enc_heads, dec_heads, norm_pix_loss, ratio=0.75):
    """The whole official forward: ``(loss, pred, mask)``."""
    latent, mask, ids_restore, _ = encoder(sd, images, enc_heads, noise, ratio)
    pred = decoder(sd, latent, ids_restore, dec_heads)
    return loss(images, pred, mask, sd["patch_embed.proj.weight"].shape[-1], norm_pix_loss), pred, mask
