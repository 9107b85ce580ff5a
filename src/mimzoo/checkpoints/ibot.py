"""bytedance/ibot checkpoints in: training checkpoints or released backbones -> :class:`mimzoo.methods.iBOT`.

The official ``vision_transformer.py`` keys are timm's, plus ``masked_embed`` [D]; the head's
weight-normalised last layers are ``weight_g``/``weight_v`` (``nn.utils.weight_norm``)."""

from __future__ import annotations

import logging
import warnings

import torch
from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import load_strict, official_args, vit_encoder_sizes

log = logging.getLogger(__name__)

_HEAD_RENAMES = (("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
                 ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
                 ("last_layer2.weight_g", "last_layer2.parametrizations.weight.original0"),
                 ("last_layer2.weight_v", "last_layer2.parametrizations.weight.original1"))
_HINT = (
    "mimzoo-import ibot expects a bytedance/ibot checkpoint: a training checkpoint (checkpoint.pth with "
    "'teacher', 'student' and 'ibot_loss') or a released backbone (checkpoint_teacher.pth, {'state_dict': ...} "
    "or a bare ViT state dict). Pass encoder.num_heads=... for non-standard widths."
)


def _official_name(key: str) -> str:
    """Our key -> the official one, for error messages."""
    for prefix, official in (("teacher_head.", "teacher: head."), ("student_head.", "student: head."),
                             ("teacher.", "teacher: backbone."), ("student.", "student: backbone.")):
        if key.startswith(prefix):
            rest = key[len(prefix):].replace("mask_token", "masked_embed")
            for old, new in _HEAD_RENAMES:
                rest = rest.replace(new, old)
            return official + rest
    return {"center": "ibot_loss: center", "center_patch": "ibot_loss: center2"}.get(key, key)


def _part(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _backbone(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if k != "masked_embed" and not k.startswith("head.")}
    if "masked_embed" in sd:
        out["mask_token"] = sd["masked_embed"].reshape(1, 1, -1)
    return out


def _head(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in _HEAD_RENAMES:
            if k == old:
                k = new
        out[k] = v
    return out


@register_importer("ibot")
def _import_ibot(ckpt, path: str, overrides: dict):
    """bytedance/ibot weights -> :class:`mimzoo.methods.iBOT` (student, teacher, heads and centres when
    the file has them; a backbone-only release initialises both backbones from it, heads fresh)."""
    from mimzoo.methods.ibot import iBOT

    full = isinstance(ckpt, dict) and "teacher" in ckpt
    if full:
        teacher = _part(ckpt["teacher"], "module.") or ckpt["teacher"]
        student = _part(ckpt["student"], "module.") or ckpt["student"]
        t_backbone, s_backbone = _part(teacher, "backbone."), _part(student, "backbone.")
        t_head, s_head = _part(teacher, "head."), _part(student, "head.")
    else:
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        sd = _part(sd, "backbone.") or sd
        t_backbone = s_backbone = sd
        t_head = s_head = None
    if not isinstance(t_backbone, dict) or "patch_embed.proj.weight" not in t_backbone:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an iBOT checkpoint (no ViT backbone found; top-level keys {keys})\n{_HINT}")
    encoder = vit_encoder_sizes(t_backbone, path, (overrides.get("encoder") or {}).get("num_heads"))
    head = dict(iBOT.default_head)
    args = official_args(ckpt)
    if t_head:
        linears = sorted(int(k.split(".")[1]) for k in t_head if k.startswith("mlp.") and k.endswith(".weight"))
        v1 = t_head["last_layer.weight_v"]
        v2 = t_head.get("last_layer2.weight_v", v1)
        head.update(out_dim=v1.shape[0], patch_out_dim=v2.shape[0], bottleneck_dim=v1.shape[1],
                    hidden_dim=t_head[f"mlp.{linears[0]}.weight"].shape[0], num_layers=len(linears),
                    shared_head=v2.shape == v1.shape and torch.equal(v1, v2),
                    norm_last_layer=bool(getattr(args, "norm_last_layer", False)))
    hparams = OmegaConf.to_container(OmegaConf.merge(dict(encoder=encoder, head=head), overrides))
    log.info("iBOT from %s: encoder %s, head %s", path, hparams["encoder"], hparams["head"])
    model = iBOT(**hparams)
    state = {}
    for name, backbone in (("teacher", t_backbone), ("student", s_backbone)):
        state.update({f"{name}.{k}": v for k, v in _backbone(backbone).items()})
    if t_head:
        for name, part in (("teacher_head", t_head), ("student_head", s_head)):
            state.update({f"{name}.{k}": v for k, v in _head(part).items()})
            if hparams["head"]["shared_head"]:  # one module under two names: both names in the state dict
                for _, new in _HEAD_RENAMES[:2]:
                    state.setdefault(f"{name}.{new.replace('last_layer', 'last_layer2', 1)}", state[f"{name}.{new}"])
    else:
        warnings.warn(f"{path} holds a backbone only: the projection heads are freshly initialised and the "
                      "centres are zero, so the iBOT loss is meaningless until they are trained", stacklevel=3)
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(("teacher_head.", "student_head."))})
    loss_state = ckpt.get("ibot_loss", {}) if full else {}
    if "center" in loss_state:
        state["center"], state["center_patch"] = loss_state["center"], loss_state["center2"]
    else:
        state["center"], state["center_patch"] = model.center, model.center_patch
    return load_strict(model, state, _official_name, path, _HINT)
