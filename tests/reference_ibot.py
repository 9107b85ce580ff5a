"""bytedance/ibot restated line by line, functionally, on official-format state dicts: the reference
mimzoo's iBOT is checked against. Written from the official source (bytedance/ibot @ da316d8), not from
mimzoo's reading of it; each function names what it restates:

* ``models/vision_transformer.py``: ``VisionTransformer.prepare_tokens`` / ``mask_model`` /
  ``interpolate_pos_encoding`` (``scale_factor=(w0 + 0.1) / sqrt(N)``, which ``F.interpolate`` uses as
  the sampling scale) / ``forward``; ``Block``, ``Attention``, ``Mlp`` (``vit_*``: ``qkv_bias=True``).
* ``models/head.py``: ``iBOTHead.forward`` (3-D input: MLP, L2-normalise, ``last_layer`` on ``[CLS]``,
  ``last_layer2`` on patches; ``nn.utils.weight_norm``: ``weight = g * v / ||v||`` per output row).
* ``utils.py``: ``MultiCropWrapper.forward`` (one backbone pass per run of equal crop widths).
* ``main_ibot.py``: ``iBOTLoss`` (schedules, forward, ``update_center``), the ``train_one_epoch`` step up
  to the loss, and the ``save_dict`` a training checkpoint holds (:func:`official_checkpoint`).
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --- models/vision_transformer.py -------------------------------------------------------------------
def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _attention(x, sd, name, num_heads):
    B, N, C = x.shape
    qkv = F.linear(x, sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(x, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])


def _block(x, sd, p, num_heads):
    y = _attention(_layer_norm(x, sd, f"{p}.norm1"), sd, f"{p}.attn", num_heads)
    x = x + y
    h = F.gelu(F.linear(_layer_norm(x, sd, f"{p}.norm2"), sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def interpolate_pos_encoding(sd, x, w, h):
    """``VisionTransformer.interpolate_pos_encoding``, as written (``w`` is the input's dim 2)."""
    pos_embed = sd["pos_embed"]
    patch_size = sd["patch_embed.proj.weight"].shape[-1]
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    # we add a small number to avoid floating point error in the interpolation
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def prepare_tokens(sd, x, mask=None):
    """``VisionTransformer.prepare_tokens`` with ``mask_model``: ``mask`` is ``[B, h, w]`` bool."""
    B, nc, w, h = x.shape
    weight = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1])
    if mask is not None:
        x = x.clone()
        x.permute(0, 2, 3, 1)[mask, :] = sd["masked_embed"].to(x.dtype)
    x = x.flatten(2).transpose(1, 2)
    cls_tokens = sd["cls_token"].expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + interpolate_pos_encoding(sd, x, w, h)
    return x


def vision_transformer(sd, x, num_heads, mask=None, masked_im_modeling=False):
    """``VisionTransformer.forward(x, mask=mask)`` with ``return_all_tokens=True`` (what main_ibot.py
    builds): the mask is applied only when the backbone has ``masked_im_modeling`` set."""
    if masked_im_modeling:
        assert mask is not None
        x = prepare_tokens(sd, x, mask=mask)
    else:
        x = prepare_tokens(sd, x)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        x = _block(x, sd, f"blocks.{i}", num_heads)
    return _layer_norm(x, sd, "norm")


# --- models/head.py ---------------------------------------------------------------------------------
def _weight_norm_linear(x, sd, name):
    g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
    return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


def ibot_head(sd, x):
    """``iBOTHead.forward`` on ``[B, 1 + N, D]`` (no BatchNorm, GELU, bottleneck > 0): ``(x1, x2)``."""
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mlp.")})
    for j, i in enumerate(layers):  # CustomSequential(Linear, GELU, Linear, GELU, Linear)
        x = F.linear(x, sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"])
        if j < len(layers) - 1:
            x = F.gelu(x)
    x = nn.functional.normalize(x, dim=-1, p=2)
    x1 = _weight_norm_linear(x[:, 0], sd, "last_layer")
    x2 = _weight_norm_linear(x[:, 1:], sd, "last_layer2")
    return x1, x2


# --- utils.py ---------------------------------------------------------------------------------------
def multi_crop_wrapper(state, x, num_heads, mask=None, masked_im_modeling=False):
    """``MultiCropWrapper.forward(x, mask=mask, return_backbone_feat=True)`` on a ``teacher`` / ``student``
    state dict (``backbone.*``, ``head.*``, the ``module.`` prefix already removed)."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    if not isinstance(x, list):
        x = [x]
        mask = [mask] if mask is not None else None
    idx_crops = torch.cumsum(
        torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]),
            return_counts=True,
        )[1],
        0,
    )
    start_idx, kwargs = 0, {}
    for end_idx in idx_crops:
        inp_x = torch.cat(x[start_idx:end_idx])
        if mask is not None:
            inp_m = torch.cat(mask[start_idx:end_idx])
            kwargs.update(dict(mask=inp_m))
        _out = vision_transformer(backbone, inp_x, num_heads, masked_im_modeling=masked_im_modeling, **kwargs)
        if start_idx == 0:
            output = _out
        else:
            output = torch.cat((output, _out))
        start_idx = end_idx
    output_ = ibot_head(head, output)
    return output, output_


# --- main_ibot.py -----------------------------------------------------------------------------------
class iBOTLoss:  # noqa: N801
    """``main_ibot.iBOTLoss`` on one process (``dist.all_reduce`` of one rank is the identity)."""

    def __init__(
        self,
        out_dim,
        patch_out_dim,
        ngcrops,
        nlcrops,
        warmup_teacher_temp,
        teacher_temp,
        warmup_teacher_temp2,
        teacher_temp2,
        warmup_teacher_temp_epochs,
        nepochs,
        student_temp=0.1,
        center_momentum=0.9,
        center_momentum2=0.9,
        lambda1=1.0,
        lambda2=1.0,
        mim_start_epoch=0,
    ):
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.ncrops = ngcrops + nlcrops
        self.center = torch.zeros(1, out_dim)
        self.center2 = torch.zeros(1, 1, patch_out_dim)
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )
        self.teacher_temp2_schedule = (
            np.concatenate(
                (
                    np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
                    np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp2,
                )
            )
            if mim_start_epoch == 0
            else np.concatenate(
                (
                    np.ones(mim_start_epoch) * warmup_teacher_temp2,
                    np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
                    np.ones(nepochs - warmup_teacher_temp_epochs - mim_start_epoch) * teacher_temp2,
                )
            )
        )

    def __call__(self, student_output, teacher_output, student_local_cls, student_mask, epoch):
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output

        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])

        student_cls = student_cls / self.student_temp
        student_cls_c = student_cls.chunk(self.ncrops)
        student_patch = student_patch / self.student_temp
        student_patch_c = student_patch.chunk(self.ngcrops)

        temp = self.teacher_temp_schedule[epoch]
        temp2 = self.teacher_temp2_schedule[epoch]
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1)
        teacher_cls_c = teacher_cls_c.detach().chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2, dim=-1)
        teacher_patch_c = teacher_patch_c.detach().chunk(self.ngcrops)

        total_loss1, n_loss_terms1 = 0, 0
        total_loss2, n_loss_terms2 = 0, 0
        for q in range(len(teacher_cls_c)):
            for v in range(len(student_cls_c)):
                if v == q:
                    loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                    mask = student_mask[v].flatten(-2, -1)
                    loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                    total_loss2 += loss2.mean()
                    n_loss_terms2 += 1
                else:
                    loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                    total_loss1 += loss1.mean()
                    n_loss_terms1 += 1

        total_loss1 = total_loss1 / n_loss_terms1 * self.lambda1
        total_loss2 = total_loss2 / n_loss_terms2 * self.lambda2
        total_loss = dict(cls=total_loss1, patch=total_loss2, loss=total_loss1 + total_loss2)
        self.update_center(teacher_cls, teacher_patch)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_cls, teacher_patch):
        world_size = 1
        cls_center = torch.sum(teacher_cls, dim=0, keepdim=True)
        cls_center = cls_center / (len(teacher_cls) * world_size)
        self.center = self.center * self.center_momentum + cls_center * (1 - self.center_momentum)

        patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True)
        patch_center = patch_center / (len(teacher_patch) * world_size)
        self.center2 = self.center2 * self.center_momentum2 + patch_center * (1 - self.center_momentum2)


def ibot_loss_from_checkpoint(ckpt):
    """The ``iBOTLoss`` ``train_ibot`` builds from ``args``, with the checkpoint's centres restored
    (``utils.restart_from_checkpoint(..., ibot_loss=ibot_loss)``)."""
    args = ckpt["args"]
    same_dim = args.shared_head or args.shared_head_teacher
    loss = iBOTLoss(
        args.out_dim,
        args.out_dim if same_dim else args.patch_out_dim,
        args.global_crops_number,
        args.local_crops_number,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_patch_temp,
        args.teacher_patch_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        mim_start_epoch=args.pred_start_epoch,
    )
    loss.center = ckpt["ibot_loss"]["center"].clone()
    loss.center2 = ckpt["ibot_loss"]["center2"].clone()
    return loss


def train_step(ckpt, images, masks, epoch, num_heads):
    """``train_one_epoch`` from the forward passes to ``ibot_loss(...)`` (fp32, one process) on a
    ``checkpoint.pth``: returns the loss dict (``loss``, ``cls``, ``patch``), the student's backbone
    tokens on the masked global crops and on the local crops, and the updated ``iBOTLoss``."""
    args = ckpt["args"]
    student = {k[len("module.") :]: v for k, v in ckpt["student"].items()}  # DDP
    teacher = ckpt["teacher"]
    ngc = args.global_crops_number
    ibot_loss = ibot_loss_from_checkpoint(ckpt)
    _, teacher_output = multi_crop_wrapper(teacher, images[:ngc], num_heads)
    student_global, student_output = multi_crop_wrapper(
        student, images[:ngc], num_heads, mask=masks[:ngc], masked_im_modeling=args.use_masked_im_modeling
    )
    # student.module.backbone.masked_im_modeling = False
    student_local, student_local_cls = None, None
    if len(images) > ngc:
        student_local, out = multi_crop_wrapper(student, images[ngc:], num_heads)
        student_local_cls = out[0]
    all_loss = ibot_loss(student_output, teacher_output, student_local_cls, masks, epoch)
    return all_loss, student_global, student_local, ibot_loss


# --- the checkpoint main_ibot.py writes -------------------------------------------------------------
def official_args(**overrides):
    """``main_ibot.get_args_parser()`` defaults (ViT part) with ``overrides``, as the ``args`` namespace
    saved in ``save_dict``."""
    args = dict(
        arch="vit_small",
        patch_size=16,
        window_size=7,
        out_dim=8192,
        patch_out_dim=8192,
        shared_head=False,
        shared_head_teacher=True,
        norm_last_layer=True,
        momentum_teacher=0.996,
        norm_in_head=None,
        act_in_head="gelu",
        use_masked_im_modeling=True,
        pred_ratio=0.3,
        pred_ratio_var=0,
        pred_shape="block",
        pred_start_epoch=0,
        lambda1=1.0,
        lambda2=1.0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.04,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30,
        use_fp16=True,
        weight_decay=0.04,
        weight_decay_end=0.4,
        clip_grad=3.0,
        batch_size_per_gpu=128,
        epochs=100,
        freeze_last_layer=1,
        lr=0.0005,
        warmup_epochs=10,
        min_lr=1e-6,
        optimizer="adamw",
        load_from=None,
        drop_path=0.1,
        global_crops_number=2,
        global_crops_scale=(0.14, 1.0),
        local_crops_number=0,
        local_crops_scale=(0.05, 0.4),
        data_path="/path/to/imagenet/train/",
        output_dir=".",
        saveckp_freq=40,
        seed=0,
        num_workers=10,
        dist_url="env://",
        local_rank=0,
        rank=0,
        world_size=1,
        gpu=0,
        distributed=True,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def _vit_state(g, img_size, patch_size, embed_dim, depth, mlp_ratio=4, masked_im_modeling=False):
    """Random weights under ``VisionTransformer``'s state-dict keys (``head``/``fc`` are Identity)."""
    n, d, hidden = (img_size // patch_size) ** 2, embed_dim, int(embed_dim * mlp_ratio)

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "cls_token": rnd(1, 1, d),
        "pos_embed": rnd(1, n + 1, d),
        "patch_embed.proj.weight": rnd(d, 3, patch_size, patch_size),
        "patch_embed.proj.bias": rnd(d),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        sd.update(
            {
                f"{p}.norm1.weight": 1 + rnd(d),
                f"{p}.norm1.bias": rnd(d),
                f"{p}.attn.qkv.weight": rnd(3 * d, d),
                f"{p}.attn.qkv.bias": rnd(3 * d),
                f"{p}.attn.proj.weight": rnd(d, d),
                f"{p}.attn.proj.bias": rnd(d),
                f"{p}.norm2.weight": 1 + rnd(d),
                f"{p}.norm2.bias": rnd(d),
                f"{p}.mlp.fc1.weight": rnd(hidden, d),
                f"{p}.mlp.fc1.bias": rnd(hidden),
                f"{p}.mlp.fc2.weight": rnd(d, hidden),
                f"{p}.mlp.fc2.bias": rnd(d),
            }
        )
    sd.update({"norm.weight": 1 + rnd(d), "norm.bias": rnd(d)})
    if masked_im_modeling:
        sd["masked_embed"] = rnd(1, d)  # nn.Parameter(torch.zeros(1, embed_dim))
    return sd


def _head_state(g, in_dim, out_dim, patch_out_dim, shared_head, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
    """Random weights under ``iBOTHead``'s keys. A shared head's ``last_layer2`` *is* ``last_layer``, and
    ``state_dict()`` lists a shared module under both names."""
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    sd = {}
    for j, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        sd[f"mlp.{2 * j}.weight"] = torch.randn(b, a, generator=g) * 0.1
        sd[f"mlp.{2 * j}.bias"] = torch.randn(b, generator=g) * 0.05
    sd["last_layer.weight_g"] = 1 + 0.2 * torch.rand(out_dim, 1, generator=g)
    sd["last_layer.weight_v"] = torch.randn(out_dim, bottleneck_dim, generator=g)
    if shared_head:
        sd["last_layer2.weight_g"], sd["last_layer2.weight_v"] = sd["last_layer.weight_g"], sd["last_layer.weight_v"]
    else:
        sd["last_layer2.weight_g"] = 1 + 0.2 * torch.rand(patch_out_dim, 1, generator=g)
        sd["last_layer2.weight_v"] = torch.randn(patch_out_dim, bottleneck_dim, generator=g)
    return sd


def official_checkpoint(args, img_size, embed_dim, depth, hidden_dim, bottleneck_dim, epoch=40, seed=0):
    """The ``save_dict`` of ``main_ibot.train_ibot`` for a ViT trained on one node with DDP, random
    weights: the student is ``DistributedDataParallel(MultiCropWrapper(vit(masked_im_modeling=True),
    iBOTHead(shared_head=args.shared_head)))`` (keys ``module.backbone.*``, ``module.head.*``); the
    teacher is ``MultiCropWrapper(vit(), iBOTHead(shared_head=args.shared_head_teacher))`` without DDP (no
    BatchNorm) and without ``masked_embed``; ``ibot_loss`` holds the buffers ``center`` and ``center2``."""
    g = torch.Generator().manual_seed(seed)
    same_dim = args.shared_head or args.shared_head_teacher
    patch_out = args.out_dim if same_dim else args.patch_out_dim
    vit = dict(img_size=img_size, patch_size=args.patch_size, embed_dim=embed_dim, depth=depth)
    heads = dict(
        in_dim=embed_dim,
        out_dim=args.out_dim,
        patch_out_dim=args.patch_out_dim,
        hidden_dim=hidden_dim,
        bottleneck_dim=bottleneck_dim,
    )
    student = {f"backbone.{k}": v for k, v in _vit_state(g, **vit, masked_im_modeling=True).items()}
    student.update({f"head.{k}": v for k, v in _head_state(g, **heads, shared_head=args.shared_head).items()})
    teacher = {f"backbone.{k}": v for k, v in _vit_state(g, **vit).items()}
    teacher.update({f"head.{k}": v for k, v in _head_state(g, **heads, shared_head=args.shared_head_teacher).items()})
    params = [v for k, v in student.items() if not k.startswith("head.last_layer2") or not args.shared_head]
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(p.clone()) for p in params]}])
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments are in the file too
    return {
        "student": {f"module.{k}": v for k, v in student.items()},
        "teacher": teacher,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": args,
        "ibot_loss": {
            "center": torch.randn(1, args.out_dim, generator=g),
            "center2": torch.randn(1, 1, patch_out, generator=g),
        },
        "fp16_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
    }
