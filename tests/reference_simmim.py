"""An independent, functional re-statement of microsoft/SimMIM's ViT pre-training (the ``SimMIM`` module
wrapping ``VisionTransformerForSimMIM``) and of its ``MaskGenerator``, on official-format state dicts, so
that mimzoo's SimMIM can be checked against it. Nothing here imports mimzoo or timm.

Sources restated (github.com/microsoft/SimMIM, HEAD d3e29bc):

* ``models/simmim.py``: ``VisionTransformerForSimMIM.forward``, ``SimMIM.__init__/forward``,
  ``SimMIM.no_weight_decay``, ``build_simmim`` (``LayerNorm(eps=1e-6)``; ``encoder_stride = 16`` for ViT);
* ``models/vision_transformer.py``: ``PatchEmbed``, ``Attention``, ``Block``, ``Mlp``,
  ``RelativePositionBias``, ``VisionTransformer`` (a BEiT ViT);
* ``data/data_simmim.py``: ``MaskGenerator``, ``SimMIMTransform``;
* ``main_simmim.py`` (linear lr scaling), ``optimizer.py`` (pre-train param groups),
  ``lr_scheduler.py`` (``MultiStepLRScheduler``), ``config.py`` + ``configs/vit_base__800ep/
  simmim_pretrain__vit_base__img224__800ep.yaml`` (the ViT-B recipe, :data:`VIT_B_PRETRAIN`).

State dict keys are those of ``SimMIM.state_dict()`` (the ``model`` entry of an official checkpoint,
``utils.save_checkpoint``); :func:`official_simmim_keys` lists them as the module attributes define them.
The forward is the deterministic one (eval mode): dropout is 0 in the recipe, drop path (0.1 for ViT-B)
is the only stochastic part and is left out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # build_simmim: norm_layer=partial(nn.LayerNorm, eps=1e-6), every norm of the encoder
LOSS_EPS = 1e-5  # SimMIM.forward: mask.sum() + 1e-5

# The official ViT-B pre-training recipe: config.py defaults overridden by
# configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml; lr values are the *base* ones,
# scaled by official_linear_scaled_lr before use. 2048 = 128 per GPU (config default / README) x 16 GPUs.
VIT_B_PRETRAIN = dict(
    img_size=224,
    patch_size=16,
    mask_patch_size=32,
    mask_ratio=0.6,
    encoder_stride=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4,
    qkv_bias=True,
    init_values=0.1,
    use_abs_pos_emb=False,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=True,
    use_mean_pooling=False,
    drop_rate=0.0,
    drop_path_rate=0.1,
    epochs=800,
    warmup_epochs=10,
    batch_size_per_gpu=128,
    total_batch_size=2048,
    base_lr=1e-4,
    warmup_lr=5e-7,
    min_lr=5e-6,  # min_lr is unused by the multistep schedule
    lr_scheduler="multistep",
    multisteps=(700,),
    gamma=0.1,
    optimizer="adamw",
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.05,
    clip_grad=5.0,
    crop_scale=(0.67, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    hflip=0.5,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


# ------------------------------------------------------------------------------------------- keys
def official_simmim_keys(
    depth,
    *,
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    init_values=0.1,
    qkv_bias=True,
    use_mean_pooling=False,
):
    """Keys of ``SimMIM(VisionTransformerForSimMIM(...), encoder_stride).state_dict()``, in its order.

    Restates the attribute names of ``models/vision_transformer.py`` (``VisionTransformer.__init__``,
    ``Block``, ``Attention``, ``Mlp``, ``PatchEmbed``, ``RelativePositionBias``) and ``models/simmim.py``
    (``mask_token``; ``decoder = Sequential(Conv2d, PixelShuffle)``). ``relative_position_index`` is a
    *persistent* buffer there, so it is in the state dict (timm's Beit makes it non-persistent).
    ``head`` is ``Identity`` (``num_classes=0``); ``fc_norm`` exists only with mean pooling.
    """
    keys = ["encoder.cls_token"] + (["encoder.pos_embed"] if use_abs_pos_emb else []) + ["encoder.mask_token"]
    keys += ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    if use_shared_rel_pos_bias:
        keys += ["encoder.rel_pos_bias.relative_position_bias_table", "encoder.rel_pos_bias.relative_position_index"]
    for i in range(depth):
        b = f"encoder.blocks.{i}"
        keys += [f"{b}.gamma_1", f"{b}.gamma_2"] if init_values is not None else []
        keys += [f"{b}.norm1.weight", f"{b}.norm1.bias"]
        keys += [f"{b}.attn.q_bias", f"{b}.attn.v_bias"] if qkv_bias else []
        keys += [f"{b}.attn.relative_position_bias_table"] if use_rel_pos_bias else []
        keys += [f"{b}.attn.relative_position_index"] if use_rel_pos_bias else []
        keys += [f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight", f"{b}.attn.proj.bias"]
        keys += [f"{b}.norm2.weight", f"{b}.norm2.bias"]
        keys += [f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias"]
    keys += (
        ["encoder.fc_norm.weight", "encoder.fc_norm.bias"]
        if use_mean_pooling
        else ["encoder.norm.weight", "encoder.norm.bias"]
    )
    return keys + ["decoder.0.weight", "decoder.0.bias"]


# ------------------------------------------------------------------------------ position bias
def official_relative_position_index(grid):
    """``RelativePositionBias.__init__`` / ``Attention.__init__``'s index, ``[1+Wh*Ww, 1+Wh*Ww]`` long.

    Token-token entries: ``(dy + Wh-1) * (2*Ww-1) + (dx + Ww-1)`` for query minus key coordinates
    (row-major grid, ``meshgrid`` 'ij'); then, with ``R = (2Wh-1)(2Ww-1)+3`` table rows, row 0 (cls
    query -> tokens) is ``R-3``, column 0 (tokens -> cls key) is ``R-2`` and ``[0, 0]`` (cls -> cls) is
    ``R-1``, in that order of writing.
    """
    wh, ww = grid
    num_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2] query - key
    token_index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    index = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = token_index
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def _bias_from_table(table, grid):
    """``RelativePositionBias.forward``: ``table[index]`` as ``[heads, 1+N, 1+N]``."""
    n = grid[0] * grid[1] + 1
    return table[official_relative_position_index(grid).to(table.device).view(-1)].view(n, n, -1).permute(2, 0, 1)


def _check_index(sd, key, grid):
    if key in sd and not torch.equal(sd[key].cpu().long(), official_relative_position_index(grid)):
        raise ValueError(f"{key} in the state dict is not the official index for grid {grid}")


# ------------------------------------------------------------------------------------ encoder
def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)


def _attention(x, sd, name, num_heads, shared_bias, grid):
    """``Attention.forward``: one bias-less ``qkv`` linear whose bias is ``cat(q_bias, 0, v_bias)``
    (no k bias), ``q * head_dim**-0.5`` before ``q @ k^T``, own then shared relative bias added to the
    logits, softmax, ``proj``."""
    b, n, _ = x.shape
    bias = None
    if f"{name}.q_bias" in sd:
        bias = torch.cat([sd[f"{name}.q_bias"], torch.zeros_like(sd[f"{name}.v_bias"]), sd[f"{name}.v_bias"]])
    qkv = F.linear(x, sd[f"{name}.qkv.weight"], bias).reshape(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if f"{name}.relative_position_bias_table" in sd:  # per-layer bias (use_rel_pos_bias)
        _check_index(sd, f"{name}.relative_position_index", grid)
        logits = logits + _bias_from_table(sd[f"{name}.relative_position_bias_table"], grid).unsqueeze(0)
    if shared_bias is not None:
        logits = logits + shared_bias
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return F.linear(out, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])


def _block(x, sd, name, num_heads, shared_bias, grid, eps):
    """``Block.forward``: pre-norm, ``x + gamma_1 * attn(norm1(x))``, ``x + gamma_2 * mlp(norm2(x))``
    (no gamma without ``init_values``); MLP = fc1, exact GELU, fc2."""
    h = _attention(_ln(x, sd, f"{name}.norm1", eps), sd, f"{name}.attn", num_heads, shared_bias, grid)
    x = x + (sd[f"{name}.gamma_1"] * h if f"{name}.gamma_1" in sd else h)
    h = _ln(x, sd, f"{name}.norm2", eps)
    h = F.linear(
        F.gelu(F.linear(h, sd[f"{name}.mlp.fc1.weight"], sd[f"{name}.mlp.fc1.bias"])),
        sd[f"{name}.mlp.fc2.weight"],
        sd[f"{name}.mlp.fc2.bias"],
    )
    return x + (sd[f"{name}.gamma_2"] * h if f"{name}.gamma_2" in sd else h)


def official_vit_simmim_encoder(sd, images, mask, *, num_heads, patch_size=None, ln_eps=LN_EPS, prefix="encoder."):
    """``VisionTransformerForSimMIM.forward(x, mask)`` (models/simmim.py) -> feature map ``[B, D, h, w]``.

    ``mask``: ``[B, h, w]`` (model-patch grid, 1 = masked; int or bool). Steps: conv patch embedding,
    flattened row-major; ``x * (1 - w) + mask_token * w`` with ``w = mask.flatten(1)[..., None]`` cast to
    the token dtype; [CLS] prepended; ``pos_embed`` added only if present (absent in the recipe); the
    shared relative bias computed once and added in every block; blocks; final ``norm`` (LayerNorm, it is
    ``Identity`` only with mean pooling) over all 1+L tokens; [CLS] dropped; ``[B, L, D] -> [B, D, h, w]``
    by ``permute(0, 2, 1).reshape`` with ``h = w = int(L ** 0.5)`` (square grids only).
    """
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    w_pe = sd["patch_embed.proj.weight"]
    patch_size = patch_size or w_pe.shape[-1]
    if tuple(w_pe.shape[-2:]) != (patch_size, patch_size):
        raise ValueError(f"patch_embed.proj.weight is {tuple(w_pe.shape)}, not a {patch_size}px patch")
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    x = F.conv2d(images, w_pe, sd["patch_embed.proj.bias"], stride=patch_size).flatten(2).transpose(1, 2)
    b, n, _ = x.shape
    mask_token = sd["mask_token"].expand(b, n, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    if "pos_embed" in sd:
        x = x + sd["pos_embed"]
    shared_bias = None
    if "rel_pos_bias.relative_position_bias_table" in sd:
        _check_index(sd, "rel_pos_bias.relative_position_index", grid)
        shared_bias = _bias_from_table(sd["rel_pos_bias.relative_position_bias_table"], grid)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = _block(x, sd, f"blocks.{i}", num_heads, shared_bias, grid, ln_eps)
    if "norm.weight" in sd:
        x = _ln(x, sd, "norm", ln_eps)
    x = x[:, 1:]
    b, n, c = x.shape
    side = int(n**0.5)
    return x.permute(0, 2, 1).reshape(b, c, side, side)


def official_simmim_decoder(sd, z):
    """``SimMIM.decoder``: ``Conv2d(num_features, encoder_stride**2 * 3, 1)`` then ``PixelShuffle(stride)``.

    The ``3`` is hard-coded (not ``in_chans``); the stride is read back from the conv's output channels
    (official: 16 for ViT whatever the patch size, 32 for Swin)."""
    w = sd["decoder.0.weight"]
    stride = math.isqrt(w.shape[0] // 3)
    if stride * stride * 3 != w.shape[0]:
        raise ValueError(f"decoder.0.weight has {w.shape[0]} output channels, not 3 * stride**2")
    return F.pixel_shuffle(F.conv2d(z, w, sd["decoder.0.bias"]), stride)


def official_upsample_mask(mask, patch_size):
    """``SimMIM.forward``: ``[B, h, w]`` -> ``[B, 1, h*p, w*p]`` by ``repeat_interleave`` on both axes."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()


def official_simmim_loss(state_dict, images, mask, *, num_heads, patch_size=None, ln_eps=LN_EPS, return_rec=False):
    """``SimMIM.forward(x, mask)`` (models/simmim.py) with a ViT encoder: the scalar loss
    (``(loss, x_rec)`` with ``return_rec``).

    ``images``: ``[B, C, H, W]`` as the loader gives them (ImageNet mean/std normalised; the target is
    that normalised image itself, no per-patch normalisation). ``mask``: ``[B, H/p, W/p]`` from
    :func:`official_mask_generator` (model-patch grid). Loss: ``F.l1_loss(x, x_rec, reduction='none')``
    times the upsampled pixel mask (broadcast over channels), summed, divided by ``mask.sum() + 1e-5``
    (masked *pixels*, one channel) and then by ``in_chans`` (from the patch-embed weight), i.e. the mean
    |error| over masked pixel values.
    """
    patch_size = patch_size or state_dict["encoder.patch_embed.proj.weight"].shape[-1]
    in_chans = state_dict["encoder.patch_embed.proj.weight"].shape[1]
    z = official_vit_simmim_encoder(state_dict, images, mask, num_heads=num_heads, patch_size=patch_size, ln_eps=ln_eps)
    x_rec = official_simmim_decoder(state_dict, z)
    pixel_mask = official_upsample_mask(mask, patch_size)
    loss_recon = F.l1_loss(images, x_rec, reduction="none")
    loss = (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + LOSS_EPS) / in_chans
    return (loss, x_rec) if return_rec else loss


# -------------------------------------------------------------------------------------- masks
def official_mask_count(input_size, mask_patch_size, mask_ratio):
    """``MaskGenerator.__init__``: ``int(np.ceil(token_count * mask_ratio))`` in float64, token_count =
    ``(input_size // mask_patch_size) ** 2``; ceil of the float product, so e.g. 100 tokens at 0.07 give 8
    (``100 * 0.07 == 7.000000000000001``), 25 at 0.28 give 8. ViT-B: 49 tokens -> 30 (61.2 %); Swin
    192px: 36 -> 22."""
    token_count = (input_size // mask_patch_size) ** 2
    return int(np.ceil(token_count * mask_ratio))


def official_mask_generator(input_size, mask_patch_size, model_patch_size, mask_ratio, rng=None):
    """``MaskGenerator.__call__`` (data/data_simmim.py): one ``[input/model_patch]^2`` int mask (1 = masked).

    ``rng.permutation(token_count)[:mask_count]`` positions of the coarse ``(input/mask_patch)^2`` grid,
    filled row-major, then each cell repeated ``mask_patch/model_patch`` times along both axes
    (``np.repeat``). The official code calls the global ``np.random.permutation``; ``rng=None`` does the
    same, a ``np.random.RandomState(seed)`` reproduces ``np.random.seed(seed)`` exactly, a
    ``np.random.Generator`` gives another stream with the same law. dtype ``int`` as official (int64 on
    Linux; the collate turns it into a LongTensor).
    """
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError("input_size % mask_patch_size and mask_patch_size % model_patch_size must be 0")
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size**2
    chosen = (np.random if rng is None else rng).permutation(token_count)[
        : official_mask_count(input_size, mask_patch_size, mask_ratio)
    ]
    coarse = np.zeros(token_count, dtype=int)
    coarse[chosen] = 1
    return coarse.reshape(rand_size, rand_size).repeat(scale, axis=0).repeat(scale, axis=1)


# -------------------------------------------------------------------------- optimisation recipe
def official_linear_scaled_lr(lr, batch_size_per_gpu, world_size, accumulation_steps=0):
    """``main_simmim.py``: ``lr * batch_per_gpu * world_size / 512`` (applied to base, warm-up and min lr
    alike), times ``accumulation_steps`` when it is > 1. ViT-B at 2048: 1e-4 -> 4e-4, warm-up 5e-7 -> 2e-6,
    min 5e-6 -> 2e-5 (unused by multistep)."""
    lr = lr * batch_size_per_gpu * world_size / 512.0
    return lr * accumulation_steps if accumulation_steps > 1 else lr


def official_decays(name, shape, skip=("encoder.pos_embed", "encoder.cls_token"), skip_keywords=()):
    """``optimizer.get_pretrain_param_groups``: no decay for 1-d params, names ending ``.bias`` and
    ``SimMIM.no_weight_decay()`` (for ViT only ``encoder.pos_embed``/``encoder.cls_token``; ViT has no
    skip keywords). So ``encoder.mask_token`` and ``rel_pos_bias.relative_position_bias_table`` ARE
    decayed for ViT (Swin adds ``mask_token`` to its skip list, ViT does not)."""
    return not (len(shape) == 1 or name.endswith(".bias") or name in skip or any(k in name for k in skip_keywords))


def official_multistep_lr(step, *, base_lr, warmup_lr, warmup_steps, milestones, gamma=0.1):
    """``lr_scheduler.MultiStepLRScheduler._get_lr`` (``t_in_epochs=False``; steps = epochs * iters).

    Linear warm-up ``warmup_lr + t * (base_lr - warmup_lr) / warmup_steps`` for ``t < warmup_steps``, then
    ``base_lr * gamma ** bisect_right(milestones, t)``. The training loop calls ``step_update(t)`` *after*
    optimizer step ``t``, so update ``t`` runs at ``lr(t - 1)`` (update 0 at ``warmup_lr``)."""
    if step < warmup_steps:
        return warmup_lr + step * (base_lr - warmup_lr) / warmup_steps
    return base_lr * gamma ** sum(1 for m in milestones if m <= step)
