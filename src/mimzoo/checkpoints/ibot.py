"""bytedance/ibot checkpoints in: training checkpoints or released backbones -> :class:`mimzoo.methods.iBOT`.

What ``main_ibot.py`` saves (``save_dict``): ``student`` (``DistributedDataParallel`` of a
``MultiCropWrapper``: ``module.backbone.*``, ``module.head.*``), ``teacher`` (the wrapper without DDP
when the head has no BatchNorm: ``backbone.*``, ``head.*``), ``optimizer``, ``epoch``, ``args`` and
``ibot_loss`` (buffers ``center`` [1, K], ``center2`` [1, 1, K2]). The official ``vision_transformer.py``
keys are timm's, plus ``masked_embed`` [1, D] in the student only (the teacher is built without
``masked_im_modeling``); the head's weight-normalised last layers are ``weight_g``/``weight_v``
(``nn.utils.weight_norm``), a shared ``last_layer2`` listed under both names. Released backbones are
one of these backbones, bare or under ``state_dict``, with or without ``masked_embed``."""

from __future__ import annotations

import logging
import warnings

import torch
from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import load_strict, official_args, vit_encoder_sizes

log = logging.getLogger(__name__)

_HEAD_RENAMES = (
    ("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
    ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
    ("last_layer2.weight_g", "last_layer2.parametrizations.weight.original0"),
    ("last_layer2.weight_v", "last_layer2.parametrizations.weight.original1"),
)
_HINT = (
    "mimzoo-import ibot expects a bytedance/ibot checkpoint: a training checkpoint (checkpoint.pth with "
    "'teacher', 'student' and 'ibot_loss') or a released backbone (checkpoint_teacher.pth, {'state_dict': ...} "
    "or a bare ViT state dict). Pass encoder.num_heads=... for non-standard widths."
)


def _official_name(key: str) -> str:
    """Our key -> the official one, for error messages."""
    for prefix, official in (
        ("teacher_head.", "teacher: head."),
        ("student_head.", "student: head."),
        ("teacher.", "teacher: backbone."),
        ("student.", "student: backbone."),
    ):
        if key.startswith(prefix):
            rest = key[len(prefix) :].replace("mask_token", "masked_embed")
            for old, new in _HEAD_RENAMES:
                rest = rest.replace(new, old)
            return official + rest
    return {"center": "ibot_loss: center", "center_patch": "ibot_loss: center2"}.get(key, key)


def _part(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _backbone(sd: dict, mask_token: torch.Tensor) -> dict:
    """Our ViT's keys; ``mask_token`` where the backbone has no ``masked_embed`` (the teacher's: unused)."""
    out = {k: v for k, v in sd.items() if k != "masked_embed" and not k.startswith("head.")}
    out["mask_token"] = sd["masked_embed"].reshape(1, 1, -1) if "masked_embed" in sd else mask_token
    return out


def _head(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in _HEAD_RENAMES:
            if k == old:
                k = new
        out[k] = v
    return out


# main_ibot.py argument -> our iBOT argument (student_temp 0.1 and the centre momentum 0.9 are fixed there)
_FROM_ARGS = (
    ("teacher_temp", "teacher_temp"),
    ("teacher_patch_temp", "teacher_patch_temp"),
    ("warmup_teacher_temp", "warmup_teacher_temp"),
    ("warmup_teacher_patch_temp", "warmup_teacher_patch_temp"),
    ("warmup_teacher_temp_epochs", "warmup_teacher_temp_epochs"),
    ("lambda1", "lambda_cls"),
    ("lambda2", "lambda_mim"),
    ("momentum_teacher", "momentum"),
    ("drop_path", "drop_path_rate"),
    ("clip_grad", "clip_grad"),
    ("freeze_last_layer", "freeze_last_layer_epochs"),
)
_VIEWS_FROM_ARGS = (
    ("local_crops_number", "local_number"),
    ("global_crops_scale", "global_scale"),
    ("local_crops_scale", "local_scale"),
)


def _shared(part: dict) -> bool:
    """Whether a head's ``last_layer2`` is its ``last_layer`` (``state_dict`` lists a shared module twice)."""
    if "last_layer2.weight_v" not in part:
        return True
    return all(
        part[f"last_layer2.{w}"].shape == part[f"last_layer.{w}"].shape
        and torch.equal(part[f"last_layer2.{w}"], part[f"last_layer.{w}"])
        for w in ("weight_g", "weight_v")
    )


def _head_sizes(s_head: dict, t_head: dict, args) -> dict:
    """Our ``head`` arguments from the official heads: sizes, the student's and the teacher's sharing
    (``--shared_head``, ``--shared_head_teacher``) and ``--norm_last_layer`` (from ``args``, else from
    a weight-norm magnitude that is still all ones)."""
    linears = sorted(int(k.split(".")[1]) for k in s_head if k.startswith("mlp.") and k.endswith(".weight"))
    v1 = s_head["last_layer.weight_v"]
    v2 = s_head.get("last_layer2.weight_v", v1)
    norm_last_layer = getattr(args, "norm_last_layer", None)
    if norm_last_layer is None:
        norm_last_layer = bool((s_head["last_layer.weight_g"] == 1).all())
    return dict(
        out_dim=v1.shape[0],
        patch_out_dim=v2.shape[0],
        bottleneck_dim=v1.shape[1],
        hidden_dim=s_head[f"mlp.{linears[0]}.weight"].shape[0],
        num_layers=len(linears),
        shared_head=_shared(s_head),
        shared_head_teacher=_shared(t_head),
        norm_last_layer=bool(norm_last_layer),
    )


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
    args = official_args(ckpt)
    hparams = dict(encoder=encoder, head=dict(iBOT.default_head))
    if t_head:
        hparams["head"].update(_head_sizes(s_head, t_head, args))
    if args is not None:  # the training run's loss and schedule settings
        hparams.update({ours: getattr(args, name) for name, ours in _FROM_ARGS if hasattr(args, name)})
        views = {ours: getattr(args, name) for name, ours in _VIEWS_FROM_ARGS if hasattr(args, name)}
        hparams["views"] = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in views.items()}
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info(
        "iBOT from %s (epoch %s): encoder %s, head %s",
        path,
        ckpt.get("epoch") if full else None,
        hparams["encoder"],
        hparams["head"],
    )
    model = iBOT(**hparams)
    state = {}
    # The official teacher has no masked_embed and never masks: ours gets the student's (zeros, the
    # official initial value, when no backbone has one).
    mask_token = next(
        (b["masked_embed"].reshape(1, 1, -1) for b in (s_backbone, t_backbone) if "masked_embed" in b),
        torch.zeros_like(model.student.mask_token),
    )
    for name, backbone in (("teacher", t_backbone), ("student", s_backbone)):
        state.update({f"{name}.{k}": v for k, v in _backbone(backbone, mask_token).items()})
    if t_head:
        for name, part in (("teacher_head", t_head), ("student_head", s_head)):
            state.update({f"{name}.{k}": v for k, v in _head(part).items()})
            if getattr(model, name).last_layer2 is getattr(model, name).last_layer:  # one module, both names
                for _, new in _HEAD_RENAMES[:2]:
                    state.setdefault(f"{name}.{new.replace('last_layer', 'last_layer2', 1)}", state[f"{name}.{new}"])
    else:
        warnings.warn(
            f"{path} holds a backbone only: the projection heads are freshly initialised and the "
            "centres are zero, so the iBOT loss is meaningless until they are trained",
            stacklevel=3,
        )
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(("teacher_head.", "student_head."))})
    loss_state = ckpt.get("ibot_loss", {}) if full else {}
    if "center" in loss_state:
        state["center"], state["center_patch"] = loss_state["center"], loss_state["center2"]
    else:
        state["center"], state["center_patch"] = model.center, model.center_patch
    return load_strict(model, state, _official_name, path, _HINT)
