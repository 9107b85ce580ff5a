"""An independent, functional re-statement of microsoft/unilm BEiT pre-training
(``VisionTransformerForMaskedImageModeling`` and the loss of ``engine_for_pretraining.train_one_epoch``)
on official-format state dicts, so that mimzoo's BEiT and its importer can be checked against it.
Nothing here imports mimzoo or timm.

Sources restated (github.com/microsoft/unilm, HEAD 768a3c8, folder ``beit/``):

* ``modeling_pretrain.py``: ``VisionTransformerForMaskedImageModeling.__init__`` (attribute names, hence
  the state-dict keys), ``forward_features``, ``forward``; ``beit_base_patch16_224_8k_vocab``
  (``norm_layer=partial(nn.LayerNorm, eps=1e-6)``, ``qkv_bias=True``, ``vocab_size=8192``);
* ``modeling_finetune.py``: ``Attention`` (``qkv`` without bias, ``q_bias``/``v_bias`` with a zero k bias,
  optional per-block ``relative_position_bias_table`` with a *persistent* ``relative_position_index``),
  ``Block`` (``gamma_1``/``gamma_2`` when ``init_values > 0``), ``Mlp`` (exact GELU), ``PatchEmbed``,
  ``RelativePositionBias`` (the shared table, persistent index);
* ``engine_for_pretraining.py``: ``train_one_epoch`` (``labels = input_ids[bool_masked_pos]``,
  ``nn.CrossEntropyLoss()(outputs, labels)``, ``mlm_acc``);
* ``run_beit_pretraining.py``: ``get_args`` / ``get_model`` (``use_shared_rel_pos_bias=args.rel_pos_bias``
  default True, ``use_abs_pos_emb`` default False, ``init_values=args.layer_scale_init_value`` default
  0.1) and the checkpoint: ``utils.save_model`` writes ``{'model': model_without_ddp.state_dict(),
  'optimizer', 'epoch', 'scaler', 'args'}`` (:func:`official_args`).

The forward is the deterministic one (eval mode): dropout 0 in the recipe, drop path (0.1) left out.
The official step runs under ``torch.cuda.amp.autocast()``; this restatement is float32 throughout.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # beit_*_8k_vocab: norm_layer=partial(nn.LayerNorm, eps=1e-6)


# ------------------------------------------------------------------------------------------- keys
def official_keys(
    depth,
    *,
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    init_values=0.1,
    qkv_bias=True,
):
    """Keys of ``VisionTransformerForMaskedImageModeling(...).state_dict()``, in its order: the module's own
    parameters (``cls_token``, ``mask_token``, ``pos_embed``), then its children as ``__init__`` registers
    them (``patch_embed``, ``rel_pos_bias``, ``blocks``, ``norm``, ``lm_head``); inside a block its own
    ``gamma_1``/``gamma_2`` first, then ``norm1``, ``attn`` (own ``q_bias``, ``v_bias``,
    ``relative_position_bias_table``, buffer ``relative_position_index``, then ``qkv``, ``proj``), ``norm2``,
    ``mlp``. ``init_values`` of 0 or None means no gammas (``Block``: ``init_values > 0``)."""
    keys = ["cls_token", "mask_token"] + (["pos_embed"] if use_abs_pos_emb else [])
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    if use_shared_rel_pos_bias:
        keys += ["rel_pos_bias.relative_position_bias_table", "rel_pos_bias.relative_position_index"]
    for i in range(depth):
        b = f"blocks.{i}"
        keys += [f"{b}.gamma_1", f"{b}.gamma_2"] if init_values else []
        keys += [f"{b}.norm1.weight", f"{b}.norm1.bias"]
        keys += [f"{b}.attn.q_bias", f"{b}.attn.v_bias"] if qkv_bias else []
        if use_rel_pos_bias:
            keys += [f"{b}.attn.relative_position_bias_table", f"{b}.attn.relative_position_index"]
        keys += [f"{b}.attn.qkv.weight", f"{b}.attn.proj.weight", f"{b}.attn.proj.bias"]
        keys += [f"{b}.norm2.weight", f"{b}.norm2.bias"]
        keys += [f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias"]
    return keys + ["norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"]


def official_state_dict(
    *,
    img_size,
    patch_size,
    embed_dim,
    depth,
    num_heads,
    vocab_size,
    mlp_ratio=4.0,
    in_chans=3,
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    use_rel_pos_bias=False,
    init_values=0.1,
    seed=0,
    scale=0.2,
):
    """A random ``state_dict()`` of ``VisionTransformerForMaskedImageModeling`` with these arguments: every
    key of :func:`official_keys` with the shape ``__init__`` gives it (random, tables and gammas included, so
    a wrong mapping shows), the index buffers as ``RelativePositionBias.__init__`` builds them."""
    g = torch.Generator().manual_seed(seed)
    window = (img_size // patch_size, img_size // patch_size)
    num_patches = window[0] * window[1]
    num_rel = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
    hidden = int(embed_dim * mlp_ratio)
    d = embed_dim
    shapes = {
        "cls_token": (1, 1, d),
        "mask_token": (1, 1, d),
        "pos_embed": (1, num_patches + 1, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "relative_position_bias_table": (num_rel, num_heads),
        "gamma_1": (d,),
        "gamma_2": (d,),
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "q_bias": (d,),
        "v_bias": (d,),
        "qkv.weight": (3 * d, d),
        "proj.weight": (d, d),
        "proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "fc1.weight": (hidden, d),
        "fc1.bias": (hidden,),
        "fc2.weight": (d, hidden),
        "fc2.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "lm_head.weight": (vocab_size, d),
        "lm_head.bias": (vocab_size,),
    }
    sd = OrderedDict()
    for key in official_keys(
        depth,
        use_abs_pos_emb=use_abs_pos_emb,
        use_shared_rel_pos_bias=use_shared_rel_pos_bias,
        use_rel_pos_bias=use_rel_pos_bias,
        init_values=init_values,
    ):
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(window)
            continue
        short = next(s for s in sorted(shapes, key=len, reverse=True) if key == s or key.endswith("." + s))
        value = torch.randn(*shapes[short], generator=g) * scale
        sd[key] = 1 + value if short.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else value
    return sd


def official_args(**overrides):
    """The ``args`` namespace ``run_beit_pretraining.py`` saves (``get_args`` defaults; ``main`` adds
    ``window_size`` and ``patch_size`` as tuples), with ``overrides``."""
    args = dict(
        batch_size=64,
        epochs=300,
        save_ckpt_freq=20,
        discrete_vae_weight_path="/data/dall_e_tokenizer_weight",
        discrete_vae_type="dall-e",
        model="beit_base_patch16_224_8k_vocab",
        rel_pos_bias=True,
        abs_pos_emb=False,
        layer_scale_init_value=0.1,
        num_mask_patches=75,
        max_mask_patches_per_block=None,
        min_mask_patches_per_block=16,
        input_size=224,
        second_input_size=112,
        drop_path=0.1,
        opt="adamw",
        opt_eps=1e-8,
        opt_betas=[0.9, 0.999],
        clip_grad=3.0,
        momentum=0.9,
        weight_decay=0.05,
        weight_decay_end=0.05,
        lr=1.5e-3,
        warmup_lr=1e-6,
        min_lr=1e-5,
        warmup_epochs=10,
        warmup_steps=-1,
        train_interpolation="bicubic",
        second_interpolation="lanczos",
        data_path="/data/imagenet/train",
        imagenet_default_mean_and_std=False,
        output_dir="/out",
        log_dir="/out",
        device="cuda",
        seed=0,
        resume="",
        auto_resume=True,
        start_epoch=0,
        num_workers=10,
        pin_mem=True,
        world_size=16,
        local_rank=0,
        dist_on_itp=False,
        dist_url="env://",
        distributed=True,
        rank=0,
        gpu=0,
        dist_backend="nccl",
        window_size=(14, 14),
        patch_size=(16, 16),
    )
    args.update(overrides)
    return argparse.Namespace(**args)


# ------------------------------------------------------------------------------ position bias
def relative_position_index(window_size):
    """``RelativePositionBias.__init__`` (and ``Attention.__init__``), step by step: ``[1+Wh*Ww, 1+Wh*Ww]``."""
    num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
    coords_h = torch.arange(window_size[0])
    coords_w = torch.arange(window_size[1])
    coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))  # 2, Wh, Ww (torch's default)
    coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # 2, Wh*Ww, Wh*Ww
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
    relative_coords[:, :, 0] += window_size[0] - 1  # shift to start from 0
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    index = torch.zeros(size=(window_size[0] * window_size[1] + 1,) * 2, dtype=relative_coords.dtype)
    index[1:, 1:] = relative_coords.sum(-1)  # Wh*Ww, Wh*Ww
    index[0, 0:] = num_relative_distance - 3  # cls query -> tokens
    index[0:, 0] = num_relative_distance - 2  # tokens -> cls key
    index[0, 0] = num_relative_distance - 1  # cls -> cls
    return index


def relative_position_bias(table, index, window_size):
    """``RelativePositionBias.forward`` (and the per-block bias in ``Attention.forward``): ``[nH, 1+N, 1+N]``."""
    n = window_size[0] * window_size[1] + 1
    bias = table[index.view(-1)].view(n, n, -1)  # Wh*Ww,Wh*Ww,nH
    return bias.permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------ modules
def _layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)


def attention(x, sd, name, num_heads, window_size, rel_pos_bias=None):
    """``Attention.forward(x, rel_pos_bias)``."""
    B, N, C = x.shape
    qkv_bias = None
    if f"{name}.q_bias" in sd:
        v_bias = sd[f"{name}.v_bias"]
        qkv_bias = torch.cat((sd[f"{name}.q_bias"], torch.zeros_like(v_bias, requires_grad=False), v_bias))
    qkv = F.linear(input=x, weight=sd[f"{name}.qkv.weight"], bias=qkv_bias)
    qkv = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    head_dim = q.shape[-1]  # attn_head_dim is None: dim // num_heads
    q = q * head_dim**-0.5  # qk_scale is None
    attn = q @ k.transpose(-2, -1)
    if f"{name}.relative_position_bias_table" in sd:  # window_size given: use_rel_pos_bias
        own = relative_position_bias(
            sd[f"{name}.relative_position_bias_table"], sd[f"{name}.relative_position_index"], window_size
        )
        attn = attn + own.unsqueeze(0)
    if rel_pos_bias is not None:
        attn = attn + rel_pos_bias
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    return F.linear(x, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])


def mlp(x, sd, name):
    """``Mlp.forward``: fc1, ``nn.GELU()`` (exact), fc2 (dropout 0)."""
    x = F.linear(x, sd[f"{name}.fc1.weight"], sd[f"{name}.fc1.bias"])
    return F.linear(F.gelu(x), sd[f"{name}.fc2.weight"], sd[f"{name}.fc2.bias"])


def block(x, sd, name, num_heads, window_size, rel_pos_bias=None, eps=LN_EPS):
    """``Block.forward(x, rel_pos_bias)``: with ``gamma_1`` None the plain residuals, else scaled ones."""
    if f"{name}.gamma_1" not in sd:
        x = x + attention(
            _layer_norm(x, sd, f"{name}.norm1", eps), sd, f"{name}.attn", num_heads, window_size, rel_pos_bias
        )
        x = x + mlp(_layer_norm(x, sd, f"{name}.norm2", eps), sd, f"{name}.mlp")
    else:
        x = x + sd[f"{name}.gamma_1"] * attention(
            _layer_norm(x, sd, f"{name}.norm1", eps), sd, f"{name}.attn", num_heads, window_size, rel_pos_bias
        )
        x = x + sd[f"{name}.gamma_2"] * mlp(_layer_norm(x, sd, f"{name}.norm2", eps), sd, f"{name}.mlp")
    return x


def forward_features(sd, x, bool_masked_pos, *, num_heads, eps=LN_EPS):
    """``VisionTransformerForMaskedImageModeling.forward_features(x, bool_masked_pos)``: ``[B, 1+N, D]``."""
    w_pe = sd["patch_embed.proj.weight"]
    patch = w_pe.shape[-2:]
    window_size = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])  # PatchEmbed.patch_shape (asserted size)
    x = F.conv2d(x, w_pe, sd["patch_embed.proj.bias"], stride=tuple(patch)).flatten(2).transpose(1, 2)
    batch_size, seq_len, _ = x.size()

    cls_tokens = sd["cls_token"].expand(batch_size, -1, -1)
    mask_token = sd["mask_token"].expand(batch_size, seq_len, -1)

    # replace the masked visual tokens by mask_token
    w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w

    x = torch.cat((cls_tokens, x), dim=1)
    if "pos_embed" in sd:
        x = x + sd["pos_embed"]

    rel_pos_bias = None
    if "rel_pos_bias.relative_position_bias_table" in sd:
        rel_pos_bias = relative_position_bias(
            sd["rel_pos_bias.relative_position_bias_table"], sd["rel_pos_bias.relative_position_index"], window_size
        )
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        x = block(x, sd, f"blocks.{i}", num_heads, window_size, rel_pos_bias, eps)
    return _layer_norm(x, sd, "norm", eps)


def forward(sd, x, bool_masked_pos, *, num_heads, return_all_tokens=False, eps=LN_EPS):
    """``VisionTransformerForMaskedImageModeling.forward``: ``lm_head`` on the masked tokens ``[M, vocab]``
    (row-major over images, then positions: boolean indexing), or on all with ``return_all_tokens``."""
    x = forward_features(sd, x, bool_masked_pos=bool_masked_pos, num_heads=num_heads, eps=eps)
    x = x[:, 1:]
    if return_all_tokens:
        return F.linear(x, sd["lm_head.weight"], sd["lm_head.bias"])
    return F.linear(x[bool_masked_pos], sd["lm_head.weight"], sd["lm_head.bias"])


def pretraining_loss(sd, samples, bool_masked_pos, input_ids, *, num_heads, eps=LN_EPS):
    """The loss of one ``train_one_epoch`` step: ``(loss, outputs, mlm_acc)``.

    ``input_ids = d_vae.get_codebook_indices(images).flatten(1)`` are given (``[B, N]``, the codes of the
    tokenizer's view of the same crops); ``bool_masked_pos`` is the loader's ``[B, Wh, Ww]`` (or flat)
    mask, flattened and cast to bool; ``labels = input_ids[bool_masked_pos]``;
    ``outputs = model(samples, bool_masked_pos=bool_masked_pos, return_all_tokens=False)``;
    ``loss = nn.CrossEntropyLoss()(input=outputs, target=labels)`` (mean over masked tokens of the whole
    batch); ``mlm_acc = (outputs.max(-1)[1] == labels).float().mean()``.
    """
    input_ids = input_ids.flatten(1)
    bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)
    labels = input_ids[bool_masked_pos]
    outputs = forward(sd, samples, bool_masked_pos=bool_masked_pos, num_heads=num_heads, eps=eps)
    loss = F.cross_entropy(outputs, labels)
    mlm_acc = (outputs.max(-1)[1] == labels).float().mean()
    return loss, outputs, mlm_acc
