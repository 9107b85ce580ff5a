"""An independent, functional re-statement of bytedance/ibot's forward and ``iBOTLoss`` on official-format
state dicts (``backbone.*`` / ``head.*`` keys, ``masked_embed``, ``weight_g``/``weight_v``), used to
check that mimzoo's iBOT computes the same loss on the same weights, crops and masks.

It follows the official structure: ``x[mask] = masked_embed`` after the patch projection, ``[CLS]``
concatenated, positions added (bicubic resize for other crop sizes), pre-norm blocks, final LN; the head
is MLP -> L2 normalise -> ``g * v / ||v||``; the loss loops over (teacher view, student view) pairs.
"""

import torch
import torch.nn.functional as F


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _attention(x, sd, name, num_heads):
    b, n, d = x.shape
    qkv = F.linear(x, sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"]).reshape(b, n, 3, num_heads, d // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // num_heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"])


def vit(sd, images, num_heads, mask=None):
    """Official ``VisionTransformer.forward(x, mask=mask, return_all_tokens=True)``."""
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    b, d, h, wd = x.shape
    x = x.flatten(2).transpose(1, 2)
    if mask is not None:
        x = x.clone()
        x[mask.reshape(b, -1)] = sd["masked_embed"].to(x.dtype)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1
    if n != h * wd:
        side = int(n ** 0.5)
        grid = pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, wd), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * wd, d)], dim=1)
    x = x + pos
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        x = x + _attention(_layer_norm(x, sd, f"{p}.norm1"), sd, f"{p}.attn", num_heads)
        y = _layer_norm(x, sd, f"{p}.norm2")
        y = F.linear(F.gelu(F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                     sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        x = x + y
    return _layer_norm(x, sd, "norm")


def head(sd, tokens):
    """Official ``iBOTHead.forward`` on all tokens: ``(x1 [B, K], x2 [B, N, K2])``."""
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mlp.")})
    x = tokens
    for j, i in enumerate(layers):
        x = F.linear(x, sd[f"mlp.{i}.weight"], sd[f"mlp.{i}.bias"])
        if j < len(layers) - 1:
            x = F.gelu(x)
    x = F.normalize(x, dim=-1, p=2)

    def last(name):
        g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
        return g * v / v.norm(dim=1, keepdim=True)

    return x[:, 0] @ last("last_layer").t(), x[:, 1:] @ last("last_layer2").t()


def ibot_loss(teacher, student, center, center2, crops, masks, num_heads, temps):
    """Official ``main_ibot.py`` training step up to the loss: teacher on the global crops, student on
    masked global crops and (a second pass) the local crops, then ``iBOTLoss.forward``."""
    t_sd = {k[len("backbone."):]: v for k, v in teacher.items() if k.startswith("backbone.")}
    t_head = {k[len("head."):]: v for k, v in teacher.items() if k.startswith("head.")}
    s_sd = {k[len("backbone."):]: v for k, v in student.items() if k.startswith("backbone.")}
    s_head = {k[len("head."):]: v for k, v in student.items() if k.startswith("head.")}
    student_temp, teacher_temp, teacher_temp2 = temps
    ngc = 2
    globals_ = torch.cat(crops[:ngc])
    teacher_cls, teacher_patch = head(t_head, vit(t_sd, globals_, num_heads))
    student_cls, student_patch = head(s_head, vit(s_sd, globals_, num_heads, mask=torch.cat(masks)))
    local_cls = head(s_head, vit(s_sd, torch.cat(crops[ngc:]), num_heads))[0] if len(crops) > ngc else None

    student_cls_c = (student_cls / student_temp).chunk(ngc)
    student_patch_c = (student_patch / student_temp).chunk(ngc)
    if local_cls is not None:
        student_cls_c += (local_cls / student_temp).chunk(len(crops) - ngc)
    teacher_cls_c = F.softmax((teacher_cls - center) / teacher_temp, dim=-1).chunk(ngc)
    teacher_patch_c = F.softmax((teacher_patch - center2) / teacher_temp2, dim=-1).chunk(ngc)
    total1, n1, total2, n2 = 0, 0, 0, 0
    for q in range(len(teacher_cls_c)):
        for v in range(len(student_cls_c)):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                mask = masks[v].flatten(-2, -1).float()
                loss2 = torch.sum(loss2 * mask, dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total2 += loss2.mean()
                n2 += 1
            else:
                loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                total1 += loss1.mean()
                n1 += 1
    return total1 / n1 + total2 / n2
