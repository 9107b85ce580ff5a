"""microsoft/unilm BEiT checkpoints in -> :class:`mimzoo.methods.BEiT`.

Two layouts, told apart by their keys:

* pre-training (``beit/run_beit_pretraining.py``, ``utils.save_model``: ``{'model': state_dict, ...}`` of
  ``VisionTransformerForMaskedImageModeling``): ``mask_token``, ``lm_head``, a shared
  ``rel_pos_bias`` table with its (persistent) index, layer scale ``gamma_1/gamma_2``. Every weight maps
  onto ours (``<key>`` -> ``encoder.<key>``, ``lm_head`` -> ``head``); the indexes are checked and dropped.
* a fine-tuning backbone (timm's ``beit_*`` release weights, a ``Beit`` state dict; or BEiT's own
  fine-tuned ``VisionTransformer``): no ``mask_token``/``lm_head``, a table per block, mean pooling with
  ``fc_norm``, a classifier ``head``. The encoder takes it as it is (per-block tables,
  ``global_pool="avg"``), so features and export equal timm's; the classifier is dropped and the mask
  token and ``lm_head`` start fresh.

The tokenizer is not in the file: ``tokenizer=`` a spec (``{"kind": "dvae", "ckpt": ...}``,
``{"kind": "dalle", "path": ...}``) or any module with the :class:`~mimzoo.nn.tokenizer.Tokenizer`
interface. Without one the module is encoder-only (features, ``mimzoo-eval``, export; no loss).
"""

from __future__ import annotations

import logging
import warnings

from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import (
    beit_encoder_sizes,
    drop_relative_position_index,
    load_strict,
    model_state,
    official_args,
    rename,
)

log = logging.getLogger(__name__)

_RENAMES = (("lm_head.", "head."),)
_HINT = (
    "mimzoo-import beit expects a microsoft/unilm BEiT pre-training checkpoint (checkpoint-*.pth of "
    "run_beit_pretraining.py, beit_*_pt22k.pth) or a fine-tuning backbone (timm's beit_* state dict, BEiT's "
    "fine-tuned VisionTransformer). Head counts other than the tables' come as encoder.num_heads=...; "
    "shape mismatches come from overrides that contradict the weights (drop them)."
)
# BEiT-style options the methods take at their top level (the rest of the inferred sizes go under ``encoder``)
METHOD_LEVEL = ("layer_scale_init", "use_abs_pos_emb", "use_shared_rel_pos_bias")
_ENCODER_DEFAULTS = {"use_rel_pos_bias": False, "global_pool": "token"}


def _ours(key: str) -> str:
    new = rename(key, _RENAMES)
    return new if new != key else f"encoder.{key}"


def _official_name(key: str) -> str:
    old = rename(key, [(new, old) for old, new in _RENAMES])
    return old[len("encoder.") :] if old.startswith("encoder.") else old


def not_beit(ckpt, sd: dict | None, path: str, method: str = "beit") -> str | None:
    """One line naming the importer for a file of another method, or None when it may be BEiT-style."""
    if isinstance(ckpt, dict) and "teacher" in ckpt and "student" in ckpt:
        return (
            f"{path} is an iBOT/DINO training checkpoint (teacher, student): use `mimzoo-import ibot {path} out.ckpt`"
        )
    if sd is None:
        return None
    if any(k.startswith("decoder_") for k in sd):
        which = "convmae" if "patch_embed1.proj.weight" in sd else "mae"
        return f"{path} is a {which.upper()} checkpoint (decoder_* keys): use `mimzoo-import {which} {path} out.ckpt`"
    if "blocks.0.attn.qkv.bias" in sd:
        return (
            f"{path} is a plain ViT (attn.qkv.bias: MAE, iBOT, DeiT weights), not a BEiT-style one "
            f"(attn.q_bias/v_bias): use `mimzoo-import mae` or `mimzoo-import ibot`"
        )
    if method == "beit" and any(k.startswith("encoder.") for k in sd) and "decoder.0.weight" in sd:
        return f"{path} is a SimMIM checkpoint (encoder.*, decoder.0.*): use `mimzoo-import simmim {path} out.ckpt`"
    if method != "beit" and "lm_head.weight" in sd:
        return f"{path} is a BEiT pre-training checkpoint (lm_head): use `mimzoo-import beit {path} out.ckpt`"
    return None


def method_kwargs(encoder: dict) -> dict:
    """Inferred :class:`~mimzoo.nn.BEiTEncoder` kwargs -> the method's: the options BEiT and SimMIM take
    themselves at the top level, the rest under ``encoder`` (options left out where they are the default)."""
    encoder = dict(encoder)
    top = {k: encoder.pop(k) for k in METHOD_LEVEL}
    for k, default in _ENCODER_DEFAULTS.items():
        if encoder.get(k) == default:
            encoder.pop(k)
    return {"encoder": encoder, **top}


@register_importer("beit")
def _import_beit(ckpt, path: str, overrides: dict):
    """microsoft/unilm BEiT pre-training weights, or a timm/BEiT fine-tuning backbone -> :class:`BEiT`."""
    from mimzoo.methods.beit import BEiT

    wrong = not_beit(ckpt, None, path)
    if wrong:
        raise ValueError(wrong)
    if isinstance(ckpt, dict) and "model" not in ckpt and isinstance(ckpt.get("state_dict"), dict):
        ckpt = {**ckpt, "model": ckpt["state_dict"]}  # timm's train.py checkpoints
    sd = model_state(ckpt, path)
    wrong = not_beit(ckpt, sd, path)
    required = ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight")
    if wrong or any(k not in sd for k in required):
        raise ValueError(
            wrong or f"{path} is not a BEiT checkpoint: missing {[k for k in required if k not in sd]}; {_HINT}"
        )
    overrides = dict(overrides)
    tokenizer = overrides.pop("tokenizer", None)  # may be a module: kept out of the OmegaConf merge
    encoder = beit_encoder_sizes(sd, path, img_size=(overrides.get("encoder") or {}).get("img_size"))
    args = official_args(ckpt)
    if encoder["layer_scale_init"] is not None and getattr(args, "layer_scale_init_value", None):
        encoder["layer_scale_init"] = float(args.layer_scale_init_value)
    pretraining = "mask_token" in sd
    lm_head = sd.get("lm_head.weight")
    hparams = method_kwargs(encoder)
    if tokenizer is None:  # encoder-only: the head is sized by the weights (BEiT's 8192 codes without them)
        hparams["num_tokens"] = int(lm_head.shape[0]) if lm_head is not None else 8192
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info("BEiT (%s) from %s: %s", "pre-training" if pretraining else "fine-tuning backbone", path, hparams)
    try:
        model = BEiT(**hparams, tokenizer=tokenizer)
    except ImportError as err:  # the DALL-E tokenizer without its package: a user's fix, not a traceback
        raise ValueError(str(err)) from err
    if lm_head is not None and model.head.out_features != lm_head.shape[0]:
        raise ValueError(
            f"{path}: lm_head predicts {lm_head.shape[0]} codes but the tokenizer has "
            f"{model.head.out_features}; give the tokenizer the checkpoint was trained with "
            f"({_trained_with(args)})"
        )
    state = {
        _ours(k): v
        for k, v in drop_relative_position_index(sd, model.grid_size[0], path).items()
        if not k.startswith("head.")
    }  # a fine-tuned classifier (pre-training has lm_head instead)
    fresh = [name for name in ("encoder.mask_token", "head.weight", "head.bias") if name not in state]
    if fresh:
        own = model.state_dict()
        state.update({name: own[name] for name in fresh})
        classifier = (
            f" (its {sd['head.weight'].shape[0]}-class classifier head is dropped)" if "head.weight" in sd else ""
        )
        if tokenizer is not None:
            warnings.warn(
                f"{path} has no {', '.join(_official_name(n) for n in fresh)}{classifier}: they are freshly "
                "initialised, so the MIM loss is meaningless until they are trained",
                stacklevel=3,
            )
        else:
            log.info("%s: %s freshly initialised%s", path, ", ".join(_official_name(n) for n in fresh), classifier)
    if tokenizer is None:
        log.info(
            "%s imported without a tokenizer: features, mimzoo-eval and export work; the loss needs tokenizer=... (%s)",
            path,
            _trained_with(args),
        )
    return load_strict(model, state, _official_name, path, _HINT)


def _trained_with(args) -> str:
    """What the official ``args`` say about the tokenizer, for messages."""
    kind = getattr(args, "discrete_vae_type", None)
    if kind is None:
        return "BEiT's releases use the DALL-E tokenizer: tokenizer={'kind': 'dalle', 'path': <dir with encoder.pkl>}"
    return f"this one was trained with discrete_vae_type={kind} from {getattr(args, 'discrete_vae_weight_path', '?')}"
