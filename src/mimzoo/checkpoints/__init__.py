"""Checkpoints in and out: mimzoo checkpoints back into their method, encoders out to timm."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import lightning
import torch
from omegaconf import OmegaConf


def load_pretrained(path, map_location="cpu"):
    """Rebuild the method module a mimzoo checkpoint was written by (``last.ckpt`` or any epoch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("mimzoo") if isinstance(ckpt, dict) else None
    if not meta:
        raise ValueError(
            f"{path} is not a mimzoo checkpoint (no 'mimzoo' entry). For an official checkpoint use "
            f"`mimzoo-import <method> {path} out.ckpt` or mimzoo.load_official(<method>, path)"
        )
    module_name, cls_name = meta["method"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def export_encoder(ckpt_path, out_path) -> dict:
    """Write the encoder of a mimzoo checkpoint as a plain timm ViT state dict (``out_path``) and the
    ``timm.create_model`` keyword arguments beside it (``out_path`` + ``.json``); returns the kwargs."""
    model = load_pretrained(ckpt_path)
    kwargs, state_dict = model.export_timm()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_path)
    Path(f"{out_path}.json").write_text(json.dumps(kwargs, indent=2))
    return kwargs


def export_main(argv=None):
    """``mimzoo-export <ckpt> <out>``."""
    parser = argparse.ArgumentParser(prog="mimzoo-export", description="Export a mimzoo encoder as a timm ViT state dict.")
    parser.add_argument("ckpt", help="mimzoo checkpoint (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("out", help="output .pth (timm state dict); kwargs go to <out>.json")
    args = parser.parse_args(argv)
    kwargs = export_encoder(args.ckpt, args.out)
    call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {args.out} and {args.out}.json; load it with:\n"
          f"  model = timm.create_model({call})\n"
          f"  model.load_state_dict(torch.load({args.out!r}), strict=True)")


# --- official checkpoints in ------------------------------------------------------------------
# One importer per method: ``importer(ckpt, path, overrides) -> module``. ``ckpt`` is whatever the
# official repository saved (read safely by :func:`_read_official`); each importer maps its keys
# onto our module and loads them with ``strict=True`` through :func:`_load_strict`.

_IMPORTERS: dict[str, Callable] = {}
log = logging.getLogger(__name__)


def register_importer(method: str):
    """Decorator adding an official-format importer for ``method`` (``mae``, later ``beit``...)."""

    def deco(fn):
        _IMPORTERS[method] = fn
        return fn

    return deco


def load_official(method: str, path, **model_overrides):
    """Load an official repository's checkpoint into the matching mimzoo module (eval mode).

    What the weights fix (widths, depths, patch and image size) is inferred; ``model_overrides``
    are the method's constructor arguments, merged over the inferred ones, e.g.
    ``load_official("mae", p, encoder={"num_heads": 12}, decoder={"num_heads": 16}, norm_pix_loss=False)``.
    """
    if method not in _IMPORTERS:
        raise KeyError(f"no official importer for {method!r}; known: {', '.join(sorted(_IMPORTERS))}")
    return _IMPORTERS[method](_read_official(path), str(path), model_overrides).eval()


def import_official(method: str, src, out_ckpt, **model_overrides) -> Path:
    """Convert an official checkpoint into a mimzoo checkpoint that :func:`load_pretrained` reads."""
    model = load_official(method, src, **model_overrides)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__}  # so ``MAE.load_from_checkpoint`` works too
    model.on_save_checkpoint(ckpt)  # the same "mimzoo" entry a training run writes
    ckpt["mimzoo"]["imported_from"] = str(src)
    out = Path(out_ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:  # atomic: a crash never leaves a half-written checkpoint under the final name
        torch.save(ckpt, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def import_main(argv=None):
    """``mimzoo-import <method> <official.pth> <out.ckpt> [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="mimzoo-import", description="Convert an official checkpoint into a mimzoo checkpoint.",
        epilog="overrides use dotted keys, e.g. norm_pix_loss=false encoder.num_heads=12 decoder.num_heads=16",
    )
    parser.add_argument("method", choices=sorted(_IMPORTERS))
    parser.add_argument("src", help="official checkpoint, e.g. mae_pretrain_vit_base.pth")
    parser.add_argument("out", help="mimzoo checkpoint to write, e.g. mae_base.ckpt")
    parser.add_argument("overrides", nargs="*", help="constructor arguments as key=value (dotted for nesting)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
    try:
        out = import_official(args.method, args.src, args.out, **overrides)
    except (FileNotFoundError, ValueError, TypeError) as e:  # a user's mistake: the message, not a traceback
        raise SystemExit(f"mimzoo-import: error: {e}")
    print(f"wrote {out}; load it with mimzoo.load_pretrained({str(out)!r}) or export it with mimzoo-export")


def _read_official(path):
    """``torch.load`` without arbitrary unpickling; ``argparse.Namespace`` (official ``args``) is allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "mimzoo" in ckpt:
        raise ValueError(f"{path} is already a mimzoo checkpoint; load it with mimzoo.load_pretrained")
    return ckpt


def _model_state(ckpt, path: str) -> dict:
    """The state dict of an official checkpoint: under ``"model"`` (training/release files) or bare."""
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a state dict, or a dict with one under 'model'; found {keys}")
    return sd


def _load_strict(model, state: dict, official_name: Callable[[str], str], path: str, hint: str):
    """``load_state_dict(strict=True)``, with mismatches reported under the official key names."""
    ours = model.state_dict()
    unexpected = sorted(official_name(k) for k in state.keys() - ours.keys())
    missing = sorted(official_name(k) for k in ours.keys() - state.keys())
    shapes = sorted(f"{official_name(k)} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
                    for k, v in state.items() if k in ours and v.shape != ours[k].shape)
    if unexpected or missing or shapes:
        def show(name, keys):
            return f"\n  {name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" if keys else ""

        raise ValueError(
            f"{path} does not match {type(model).__name__}:"
            + show("unexpected keys", unexpected) + show("missing keys", missing) + show("shape mismatches", shapes)
            + f"\n{hint}"
        )
    model.load_state_dict(state, strict=True)
    return model


# MAE: official name prefix -> ours (decoder entries first, so "blocks." never eats "decoder_blocks.")
_MAE_RENAMES = (
    ("decoder_embed.", "decoder.embed."), ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."), ("decoder_pred.", "decoder.pred."),
    ("decoder_pos_embed", "decoder.pos_embed"), ("mask_token", "decoder.mask_token"),
    ("cls_token", "encoder.cls_token"), ("pos_embed", "encoder.pos_embed"), ("patch_embed.", "encoder.patch_embed."),
    ("blocks.", "encoder.blocks."), ("norm.", "encoder.norm."),
)
_MAE_HINT = (
    "mimzoo-import mae expects a facebookresearch/mae pre-training checkpoint (mae_pretrain_vit_*.pth, "
    "mae_visualize_*.pth or a main_pretrain.py checkpoint-*.pth). Fine-tuned classifiers (head.*, fc_norm.*) and "
    "other methods' files (BEiT, iBOT, timm) are not MAE pre-training checkpoints: use that method's importer. "
    "Shape mismatches come from overrides that contradict the weights (drop them) or from another architecture."
)
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-T/S/B/L/H


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return key


def _mae_official_name(key: str) -> str:
    return _rename(key, [(new, old) for old, new in _MAE_RENAMES])


def _num_blocks(sd: dict, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


def _mae_decoder_sizes(sd: dict) -> tuple[bool, dict]:
    """Whether an official MAE-style file has decoder weights, and the decoder sizes they fix
    (MAE's 512 x 8, 16 heads where absent; heads are not in the weights)."""
    has_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in sd)
    decoder = dict(dim=512, depth=8, num_heads=16, mlp_ratio=4.0)
    if "decoder_embed.weight" in sd:
        d_dim = sd["decoder_embed.weight"].shape[0]
        decoder.update(dim=d_dim, depth=_num_blocks(sd, "decoder_blocks."))
        if "decoder_blocks.0.mlp.fc1.weight" in sd:
            decoder["mlp_ratio"] = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / d_dim
    return has_decoder, decoder


@register_importer("mae")
def _import_mae(ckpt, path: str, overrides: dict):
    """facebookresearch/mae ``MaskedAutoencoderViT`` weights -> :class:`mimzoo.methods.MAE`."""
    from mimzoo.methods.mae import MAE

    sd = _model_state(ckpt, path)
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in required):
        unknown = sorted(k for k in sd if _rename(k, _MAE_RENAMES) == k)
        raise ValueError(f"{path} is not an MAE checkpoint: missing {[k for k in required if k not in sd]}"
                         f"{f'; unknown keys {unknown[:8]}' if unknown else ''}\n{_MAE_HINT}")
    dim, in_chans, patch, patch_w = sd["patch_embed.proj.weight"].shape
    num_patches = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if patch != patch_w or grid * grid != num_patches:
        raise ValueError(f"{path}: only square patches on a square grid are supported "
                         f"(patch {patch}x{patch_w}, {num_patches} position slots)")
    encoder = dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=_num_blocks(sd, "blocks."),
                   num_heads=_STANDARD_HEADS.get(dim, max(1, dim // 64)),
                   mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, in_chans=in_chans)
    has_decoder, decoder = _mae_decoder_sizes(sd)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    npl_from = "override" if "norm_pix_loss" in overrides else "args" if hasattr(args, "norm_pix_loss") else None
    hparams = dict(encoder=encoder, decoder=decoder, norm_pix_loss=getattr(args, "norm_pix_loss", True))
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info("MAE from %s: encoder %s, decoder %s, norm_pix_loss=%s (%s)", path, hparams["encoder"],
             hparams["decoder"], hparams["norm_pix_loss"], npl_from or "default: not recorded in the file; "
             "mae_visualize_* were trained without it, pass norm_pix_loss=false for them")
    model = MAE(**hparams)
    state = {_rename(k, _MAE_RENAMES): v for k, v in sd.items()}
    if not has_decoder:  # released mae_pretrain_vit_*.pth carry the encoder only
        warnings.warn(f"{path} has no decoder weights (encoder-only release); the decoder {hparams['decoder']} is "
                      "freshly initialised, so reconstructions and the loss are meaningless until it is trained",
                      stacklevel=3)
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    return _load_strict(model, state, _mae_official_name, path, _MAE_HINT)


# iBOT: official ``vision_transformer.py`` keys are timm's, plus ``masked_embed`` [D]; the head's
# weight-normalised last layers are ``weight_g``/``weight_v`` (``nn.utils.weight_norm``).
_IBOT_HEAD_RENAMES = (("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
                      ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
                      ("last_layer2.weight_g", "last_layer2.parametrizations.weight.original0"),
                      ("last_layer2.weight_v", "last_layer2.parametrizations.weight.original1"))
_IBOT_HINT = (
    "mimzoo-import ibot expects a bytedance/ibot checkpoint: a training checkpoint (checkpoint.pth with "
    "'teacher', 'student' and 'ibot_loss') or a released backbone (checkpoint_teacher.pth, {'state_dict': ...} "
    "or a bare ViT state dict). Pass encoder.num_heads=... for non-standard widths."
)


def _ibot_official_part(key: str) -> str:
    """Our key -> the official one, for error messages."""
    for prefix, official in (("teacher_head.", "teacher: head."), ("student_head.", "student: head."),
                             ("teacher.", "teacher: backbone."), ("student.", "student: backbone.")):
        if key.startswith(prefix):
            rest = key[len(prefix):].replace("mask_token", "masked_embed")
            for old, new in _IBOT_HEAD_RENAMES:
                rest = rest.replace(new, old)
            return official + rest
    return {"center": "ibot_loss: center", "center_patch": "ibot_loss: center2"}.get(key, key)


def _ibot_part(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _ibot_backbone(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if k != "masked_embed" and not k.startswith("head.")}
    if "masked_embed" in sd:
        out["mask_token"] = sd["masked_embed"].reshape(1, 1, -1)
    return out


def _ibot_head(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for old, new in _IBOT_HEAD_RENAMES:
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
        teacher = _ibot_part(ckpt["teacher"], "module.") or ckpt["teacher"]
        student = _ibot_part(ckpt["student"], "module.") or ckpt["student"]
        t_backbone, s_backbone = _ibot_part(teacher, "backbone."), _ibot_part(student, "backbone.")
        t_head, s_head = _ibot_part(teacher, "head."), _ibot_part(student, "head.")
    else:
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        sd = _ibot_part(sd, "backbone.") or sd
        t_backbone = s_backbone = sd
        t_head = s_head = None
    if not isinstance(t_backbone, dict) or "patch_embed.proj.weight" not in t_backbone:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an iBOT checkpoint (no ViT backbone found; top-level keys {keys})\n{_IBOT_HINT}")
    dim, in_chans, patch, _ = t_backbone["patch_embed.proj.weight"].shape
    grid = math.isqrt(t_backbone["pos_embed"].shape[1] - 1)
    encoder = dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=_num_blocks(t_backbone, "blocks."),
                   num_heads=_STANDARD_HEADS.get(dim, max(1, dim // 64)),
                   mlp_ratio=t_backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim, in_chans=in_chans)
    head = dict(iBOT.default_head)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
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
        state.update({f"{name}.{k}": v for k, v in _ibot_backbone(backbone).items()})
    if t_head:
        for name, part in (("teacher_head", t_head), ("student_head", s_head)):
            state.update({f"{name}.{k}": v for k, v in _ibot_head(part).items()})
            if hparams["head"]["shared_head"]:  # one module under two names: both names in the state dict
                for _, new in _IBOT_HEAD_RENAMES[:2]:
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
    return _load_strict(model, state, _ibot_official_part, path, _IBOT_HINT)

# ConvMAE: decoder entries (official prefix -> ours); every other official key is ``encoder.<key>``.
_CONVMAE_DECODER = _MAE_RENAMES[:6]  # MAE's decoder names
_CONVMAE_HINT = (
    "mimzoo-import convmae expects an Alpha-VL/ConvMAE pre-training checkpoint (MaskedAutoencoderConvViT: "
    "patch_embed1..4, blocks1..3, stage1_output_decode, stage2_output_decode, decoder_*). Fine-tuned ConvViT "
    "classifiers (head.*, fc_norm.*) lack the fusion convs and are not pre-training checkpoints."
)


def _convmae_ours(key: str) -> str:
    new = _rename(key, _CONVMAE_DECODER)
    return new if new != key else f"encoder.{key}"


def _convmae_official_name(key: str) -> str:
    old = _rename(key, [(new, old) for old, new in _CONVMAE_DECODER])
    return old[len("encoder."):] if old.startswith("encoder.") else old


@register_importer("convmae")
def _import_convmae(ckpt, path: str, overrides: dict):
    """Alpha-VL/ConvMAE ``MaskedAutoencoderConvViT`` weights -> :class:`mimzoo.methods.ConvMAE`."""
    from mimzoo.methods.convmae import ConvMAE

    sd = _model_state(ckpt, path)
    required = [f"patch_embed{i}.proj.weight" for i in (1, 2, 3)] + ["patch_embed4.weight", "pos_embed",
                                                                     "blocks3.0.mlp.fc1.weight"]
    if any(k not in sd for k in required):
        raise ValueError(f"{path} is not a ConvMAE checkpoint: missing {[k for k in required if k not in sd]}"
                         f"\n{_CONVMAE_HINT}")
    convs = [sd[f"patch_embed{i}.proj.weight"] for i in (1, 2, 3)]
    dims = [int(w.shape[0]) for w in convs]
    patches = [int(w.shape[-1]) for w in convs]
    num_patches = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches or any(w.shape[-1] != w.shape[-2] for w in convs):
        raise ValueError(f"{path}: only square patches on a square grid are supported ({num_patches} positions)")
    depth = [_num_blocks(sd, f"blocks{i}.") for i in (1, 2, 3)]
    encoder = dict(img_size=grid * patches[0] * patches[1] * patches[2], patch_size=patches, embed_dim=dims,
                   depth=depth, num_heads=_STANDARD_HEADS.get(dims[2], max(1, dims[2] // 64)),
                   mlp_ratio=[sd[f"blocks{i + 1}.0.mlp.fc1.weight"].shape[0] / dims[i] if depth[i] else 4.0
                              for i in range(3)], in_chans=int(convs[0].shape[1]))
    has_decoder, decoder = _mae_decoder_sizes(sd)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    hparams = dict(encoder=encoder, decoder=decoder, norm_pix_loss=getattr(args, "norm_pix_loss", True))
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info("ConvMAE from %s: encoder %s, decoder %s, norm_pix_loss=%s", path, hparams["encoder"],
             hparams["decoder"], hparams["norm_pix_loss"])
    model = ConvMAE(**hparams)
    state = {_convmae_ours(k): v for k, v in sd.items()}
    if not has_decoder:
        warnings.warn(f"{path} has no decoder weights; the decoder {hparams['decoder']} is freshly initialised, "
                      "so reconstructions and the loss are meaningless until it is trained", stacklevel=3)
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    return _load_strict(model, state, _convmae_official_name, path, _CONVMAE_HINT)
