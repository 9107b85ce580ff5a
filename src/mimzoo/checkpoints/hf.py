"""Hugging Face transformers in and out: ``ViTMAEForPreTraining`` ``save_pretrained`` directories <->
:class:`mimzoo.methods.MAE`, and plain ViT encoders out as ``ViTModel``. Reading and writing needs no
transformers (safetensors comes with timm); using the result does (``pip install mimzoo[hf]``).

What transformers' ``models/vit_mae/modeling_vit_mae.py`` computes, and how it lines up with mimzoo:

* the model is facebookresearch/mae's, weight for weight: pre-norm layers (``layernorm_before`` ->
  attention with separate ``query``/``key``/``value`` -> ``attention.output.dense``; ``layernorm_after`` ->
  ``intermediate.dense`` -> GELU (exact erf, ``hidden_act="gelu"``) -> ``output.dense``), the final
  ``layernorm``, then the decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_layers``,
  ``decoder_norm``, ``decoder_pred``). timm fuses q, k and v into one ``qkv`` (rows q, then k, then v, heads
  contiguous in each, as HF's ``view(..., heads, head_dim)``). One ``layer_norm_eps`` serves every norm;
* the position tables are fixed 2-D sin-cos in MAE's layout (HF rotates its own sin-cos halves "to match the
  pretrained layout"), but they are stored in the files and loaded as they are;
* masking: ``random_masking`` keeps ``ids_shuffle[:, :len_keep]`` with ``ids_shuffle = argsort(noise)`` and
  ``len_keep = int(L * (1 - mask_ratio))``, in noise order; mimzoo keeps the visible patches in grid order.
  :func:`hf_noise` gives the noise that keeps exactly a mimzoo mask's visible patches, in grid order, so both
  models see the same tokens in the same order;
* the loss: per-patch MSE against the patchified pixels (per-patch standardised with ``var + 1e-6`` under
  ``norm_pix_loss``), ``(loss * mask).sum() / mask.sum()``: :meth:`mimzoo.methods.MAE.loss`;
* ``interpolate_pos_encoding`` (bicubic resize of the tables to other image sizes) has no counterpart here:
  models are used at the size they were trained at.

File names: the transformers 4.x names (``vit.encoder.layer.<i>.attention.attention.query``...) are what the
hub's files hold and what every version reads (5.x renames them on load), so exports write them. Imports also
take transformers 5.x's module names (``vit.layers.<i>.attention.q_proj``, ``mlp.fc1``...) and the decoder
name 5.x writes (``decoder.decoder_encoder.layer.<i>``).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import load_strict
from mimzoo.errors import CheckpointError
from mimzoo.masking import num_masked

log = logging.getLogger(__name__)

EPS = 1e-6  # mimzoo's ViT and MAE decoder norms
# ViTMAEConfig's defaults, for keys a config.json leaves out
_VIT_MAE_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    decoder_num_attention_heads=16,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_intermediate_size=2048,
    mask_ratio=0.75,
    norm_pix_loss=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# --- names: ours -> transformers 4.x ---------------------------------------------------------------
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_BLOCK = {
    "attn.qkv": _QKV,
    "attn.proj": ("attention.output.dense",),
    "norm1": ("layernorm_before",),
    "norm2": ("layernorm_after",),
    "mlp.fc1": ("intermediate.dense",),
    "mlp.fc2": ("output.dense",),
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
# (timm ViT names, HF prefix of its layers), (MAEDecoder names, HF prefix of its layers)
_VIT = (
    {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    },
    "encoder.layer.",
)
_DECODER = (
    {
        "embed.weight": "decoder_embed.weight",
        "embed.bias": "decoder_embed.bias",
        "mask_token": "mask_token",
        "pos_embed": "decoder_pos_embed",
        "norm.weight": "decoder_norm.weight",
        "norm.bias": "decoder_norm.bias",
        "pred.weight": "decoder_pred.weight",
        "pred.bias": "decoder_pred.bias",
    },
    "decoder_layers.",
)
# transformers 5.x module names -> 4.x file names
_V5_NAMES = (
    (r"^(vit\.)?layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def _hf_names(key: str, part: tuple[dict, str], prefix: str) -> tuple[str, ...]:
    """The HF (4.x) name(s) of one of our keys: three for a fused ``qkv``; KeyError for a key HF has no place for."""
    top, layers = part
    if key in top:
        return (prefix + top[key],)
    m = _BLOCK_KEY.fullmatch(key)
    if not m or m[2] not in _BLOCK:
        raise KeyError(key)
    return tuple(f"{prefix}{layers}{m[1]}.{name}.{m[3]}" for name in _BLOCK[m[2]])


def hf_names(state_keys, backbone_only: bool = False) -> dict[str, tuple[str, ...]]:
    """Our key -> its HF name(s). An MAE's keys (``encoder.*``, ``decoder.*``) map into ``ViTMAEForPreTraining``
    (``vit.*``, ``decoder.*``); with ``backbone_only``, a timm ViT's keys map into ``ViTModel`` (no prefix)."""
    names, unknown = {}, []
    for key in state_keys:
        try:
            if backbone_only:
                names[key] = _hf_names(key, _VIT, "")
            elif key.startswith("encoder."):
                names[key] = _hf_names(key[len("encoder.") :], _VIT, "vit.")
            elif key.startswith("decoder."):
                names[key] = _hf_names(key[len("decoder.") :], _DECODER, "decoder.")
            else:
                raise KeyError(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"transformers' ViT classes have no place for {', '.join(unknown[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}: only a plain ViT (and MAE's decoder) exports to them; "
            "use --format timm"
        )
    return names


def to_hf_state(state: dict, backbone_only: bool = False) -> dict:
    """Our state dict (MAE, or a timm ViT with ``backbone_only``) under HF 4.x names, ``qkv`` split."""
    out = {}
    for key, names in hf_names(state, backbone_only).items():
        for name, value in zip(names, state[key].chunk(len(names))):
            out[name] = value.detach().cpu().contiguous().clone()
    return out


def canonical_hf_names(state: dict) -> dict:
    """A ``ViTMAEForPreTraining``/``ViTMAEModel`` state dict under transformers 4.x names, whichever version
    wrote it (``vit.`` added where a bare ``ViTMAEModel`` was saved)."""
    out = {}
    for key, value in state.items():
        for pattern, new in _V5_NAMES:
            key = re.sub(pattern, new, key)
        if key.startswith(("embeddings.", "encoder.layer.", "layernorm.")):
            key = "vit." + key
        out[key] = value
    return out


# --- masks -----------------------------------------------------------------------------------------
def hf_noise(mask: torch.Tensor, mask_ratio: float | None = None) -> torch.Tensor:
    """The ``noise`` for transformers' ``ViTMAE*.forward`` that makes ``random_masking`` keep exactly the
    visible patches of ``mask`` (bool ``[B, L]``, True = masked), in grid order as mimzoo's encoder does.

    ``argsort(noise)`` lists the visible patches (in grid order), then the masked ones; HF keeps the first
    ``int(L * (1 - mask_ratio))``, which must be the visible count (checked when ``mask_ratio`` is given)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise CheckpointError(f"mask must be a bool [B, L] tensor, got {mask.dtype} {tuple(mask.shape)}")
    length = mask.shape[1]
    visible = length - mask.sum(1)
    if not bool((visible == visible[0]).all()):
        raise CheckpointError("every row must keep the same number of patches (HF keeps int(L * (1 - mask_ratio)))")
    if mask_ratio is not None and int(length * (1 - mask_ratio)) != int(visible[0]):
        raise CheckpointError(
            f"HF keeps int({length} * (1 - {mask_ratio})) = {int(length * (1 - mask_ratio))} patches "
            f"but the mask leaves {int(visible[0])} visible"
        )
    return (mask.long() * length + torch.arange(length, device=mask.device)).float()


def hf_mask_ratio(ratio: float, num_patches: int) -> float:
    """A ``mask_ratio`` for which HF keeps as many patches as mimzoo's ``round(ratio * L)`` masking leaves
    (``ratio`` itself unless ``int(L * (1 - ratio))`` falls one short)."""
    keep = num_patches - num_masked(ratio, num_patches)
    for r in (ratio, 1 - keep / num_patches, 1 - (keep + 0.5) / num_patches):
        if int(num_patches * (1 - r)) == keep:
            return r
    raise AssertionError("unreachable")


# --- in ---------------------------------------------------------------------------------------------
def read_hf_dir(path) -> dict:
    """``config.json`` and the weights of a ``save_pretrained`` directory (``model.safetensors``,
    ``pytorch_model.bin``, or their sharded ``*.index.json`` forms)."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        raise CheckpointError(
            f"{path} is a file; mimzoo-import hf reads a save_pretrained directory "
            "(config.json + model.safetensors or pytorch_model.bin)"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a transformers save_pretrained directory")
    config = json.loads((path / "config.json").read_text())
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            files = [path / f for f in sorted(set(json.loads((path / index).read_text())["weight_map"].values()))]
        else:
            continue
        state = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        return {"config": config, "state": state}
    raise CheckpointError(f"{path} has no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def _square(value, name: str, problems: list) -> int:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h != w:
        problems.append(f"{name}={list(value)} (mimzoo's ViT takes square images and patches)")
    return int(h)


def _mlp_ratio(hidden: int, dim: int, name: str, problems: list) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # timm's Mlp width is int(dim * mlp_ratio)
        problems.append(f"{name}={hidden} (not int(width * ratio) for any float ratio timm would use)")
    return ratio


def mae_hparams(config: dict, path: str, layer_norm_eps=None) -> dict:
    """:class:`~mimzoo.methods.MAE` arguments equivalent to a ``ViTMAEConfig``; a ValueError lists every field
    mimzoo's MAE cannot represent exactly. ``layer_norm_eps=1e-6`` accepts a config with another eps
    (the facebook/vit-mae-* configs say 1e-12 for weights facebookresearch/mae trained with 1e-6)."""
    if config.get("model_type") != "vit_mae":
        raise CheckpointError(
            f"{path}: model_type {config.get('model_type')!r}, expected 'vit_mae' (ViTMAEForPreTraining "
            "or ViTMAEModel). mimzoo-import hf reads Hugging Face MAE directories; a plain ViT backbone "
            "is a fine-tuning model, not a pre-training one"
        )
    cfg = {**_VIT_MAE_DEFAULTS, **config}
    problems = []
    if cfg["hidden_act"] != "gelu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (mimzoo's blocks use the exact GELU, HF's 'gelu')")
    if not cfg["qkv_bias"]:
        problems.append("qkv_bias=false (mimzoo's ViT has query, key and value biases)")
    for prefix in ("", "decoder_"):
        heads, dim = cfg[f"{prefix}num_attention_heads"], cfg[f"{prefix}hidden_size"]
        if dim % heads:
            problems.append(f"{prefix}hidden_size={dim} is not divisible by {prefix}num_attention_heads={heads}")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        problems.append(f"head_dim={cfg['head_dim']} (mimzoo's heads are hidden_size / num_attention_heads wide)")
    eps = float(cfg["layer_norm_eps"])
    if eps != EPS:
        if layer_norm_eps is None:
            problems.append(
                f"layer_norm_eps={eps:g} (mimzoo's ViT and decoder norms use {EPS:g}). The facebook/vit-mae-* configs "
                f"say 1e-12, the transformers default, for weights facebookresearch/mae trained with {EPS:g}: add the "
                f"override layer_norm_eps={EPS:g} to import such a model with mimzoo's eps"
            )
        elif float(layer_norm_eps) != EPS:
            problems.append(f"override layer_norm_eps={layer_norm_eps} (the only value mimzoo can use is {EPS:g})")
        else:
            log.warning(
                "%s: config.json has layer_norm_eps=%g; importing with %g as asked (layer norm outputs "
                "change by about (%g - %g) / (2 var) relative)",
                path,
                eps,
                EPS,
                EPS,
                eps,
            )
    img = _square(cfg["image_size"], "image_size", problems)
    patch = _square(cfg["patch_size"], "patch_size", problems)
    mlp = _mlp_ratio(cfg["intermediate_size"], cfg["hidden_size"], "intermediate_size", problems)
    d_mlp = _mlp_ratio(
        cfg["decoder_intermediate_size"], cfg["decoder_hidden_size"], "decoder_intermediate_size", problems
    )
    if problems:
        raise CheckpointError(
            f"{path}/config.json cannot be represented exactly by mimzoo's MAE:\n  - " + "\n  - ".join(problems)
        )
    dropout = {k: cfg[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if cfg[k]}
    if dropout:
        log.info("%s: %s ignored: mimzoo's MAE has no dropout (eval-mode outputs are the same)", path, dropout)
    num_patches = (img // patch) ** 2
    ratio = float(cfg["mask_ratio"])
    if 0 < ratio < 1 and int(num_patches * (1 - ratio)) != num_patches - num_masked(ratio, num_patches):
        log.warning(
            "%s: mask_ratio %g: HF keeps int(L * (1 - r)) = %d of %d patches, mimzoo masks round(r * L) and keeps %d",
            path,
            ratio,
            int(num_patches * (1 - ratio)),
            num_patches,
            num_patches - num_masked(ratio, num_patches),
        )
    return dict(
        encoder=dict(
            img_size=img,
            patch_size=patch,
            embed_dim=cfg["hidden_size"],
            depth=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            mlp_ratio=mlp,
            in_chans=cfg["num_channels"],
        ),
        decoder=dict(
            dim=cfg["decoder_hidden_size"],
            depth=cfg["decoder_num_hidden_layers"],
            num_heads=cfg["decoder_num_attention_heads"],
            mlp_ratio=d_mlp,
        ),
        mask={"name": "random", "ratio": ratio},
        norm_pix_loss=bool(cfg["norm_pix_loss"]),
    )


_HINT = (
    "mimzoo-import hf expects a transformers save_pretrained directory of ViTMAEForPreTraining (or ViTMAEModel, "
    "encoder only). Classifiers (ViTMAEForImageClassification's classifier.*) and other models are not MAE "
    "pre-training checkpoints. Shape mismatches come from a config.json that contradicts the weights, or overrides."
)


@register_importer("hf", read=read_hf_dir)
def _import_hf(src: dict, path: str, overrides: dict):
    """A ``ViTMAEForPreTraining`` ``save_pretrained`` directory -> :class:`mimzoo.methods.MAE`. Sizes, heads,
    ``mask_ratio`` and ``norm_pix_loss`` come from ``config.json``; ``overrides`` go on top."""
    from mimzoo.methods.mae import MAE

    overrides = dict(overrides)
    hparams = mae_hparams(src["config"], path, overrides.pop("layer_norm_eps", None))
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info(
        "MAE from %s: encoder %s, decoder %s, mask %s, norm_pix_loss=%s",
        path,
        hparams["encoder"],
        hparams["decoder"],
        hparams["mask"],
        hparams["norm_pix_loss"],
    )
    model = MAE(**hparams)
    hf = canonical_hf_names(src["state"])
    names = hf_names(model.state_dict())
    state, used = {}, set()
    for key, hf_keys in names.items():
        if all(k in hf for k in hf_keys) and len({hf[k].shape for k in hf_keys}) == 1:
            state[key] = torch.cat([hf[k] for k in hf_keys]) if len(hf_keys) > 1 else hf[hf_keys[0]]
            used.update(hf_keys)
    if not any(k.startswith("decoder.") for k in hf):  # ViTMAEModel: the encoder only
        warnings.warn(
            f"{path} has no decoder weights (a ViTMAEModel); the decoder {hparams['decoder']} is freshly "
            "initialised, so reconstructions and the loss are meaningless until it is trained",
            stacklevel=3,
        )
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    state.update({k: v for k, v in hf.items() if k not in used})  # unexpected: reported under their own names
    official = {key: "/".join(hf_keys) for key, hf_keys in names.items()}
    return load_strict(model, state, lambda k: official.get(k, k), path, _HINT)


# --- out --------------------------------------------------------------------------------------------
def _plain_vit(encoder, what: str) -> None:
    """Refuse what transformers' ViT layers cannot compute (the weights' names are checked by :func:`hf_names`)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(encoder, VisionTransformer):
        raise CheckpointError(
            f"{what} is a {type(encoder).__name__}, not a ViT: transformers' ViT classes cannot hold it; "
            "export it with --format timm"
        )
    problems = []
    if encoder.cls_token is None or encoder.num_prefix_tokens != 1 or getattr(encoder, "no_embed_class", False):
        problems.append("one [CLS] token with its own position slot, no register tokens")
    for i, block in enumerate(encoder.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            problems.append(f"block {i} is not timm's plain Block/Attention/Mlp")
        elif type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none":
            problems.append(f"block {i}'s activation is {block.mlp.act}, not the exact GELU")
        elif block.attn.qkv.bias is None:
            problems.append(f"block {i} has no query/key/value bias")
    if problems:
        raise CheckpointError(
            f"{what} is not a plain ViT that transformers' ViT layers compute exactly: " + "; ".join(problems)
        )


def _layer_norm_eps(*modules) -> float:
    eps = {m.eps for module in modules for m in module.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise CheckpointError(f"transformers uses one layer_norm_eps for every norm; this model has {sorted(eps)}")
    return eps.pop()


def _vit_config(encoder, eps: float) -> dict:
    block = encoder.blocks[0]
    return dict(
        hidden_size=encoder.embed_dim,
        num_hidden_layers=len(encoder.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        layer_norm_eps=eps,
        image_size=int(encoder.patch_embed.img_size[0]),
        patch_size=int(encoder.patch_embed.patch_size[0]),
        num_channels=int(encoder.in_chans),
        qkv_bias=True,
    )


def image_processor_config(preprocessing: dict) -> dict:
    """A ``BitImageProcessor`` config doing mimzoo's evaluation transform: resize the shorter side to
    ``round(size / crop_pct)`` (bicubic), centre-crop ``size``, scale to [0, 1], normalise."""
    _, h, w = preprocessing["input_size"]
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[preprocessing["interpolation"]]
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": int(round(h / preprocessing["crop_pct"]))},
        "resample": resample,
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocessing["mean"]),
        "image_std": list(preprocessing["std"]),
    }


def save_hf(model, out_dir, preprocessing: dict, backbone_only: bool = False) -> str:
    """Write ``model`` as a transformers ``save_pretrained`` directory (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``); returns the class written: ``ViTMAEForPreTraining`` for an MAE with a ViT
    encoder (same loss for the same mask, through :func:`hf_noise`), else ``ViTModel`` of the evaluation encoder
    (``last_hidden_state[:, 0]`` is :meth:`~mimzoo.methods.MIMMethod.features`)."""
    from safetensors.torch import save_file

    from mimzoo.methods.mae import MAE
    from mimzoo.nn import MAEDecoder

    if not model.has_features:
        raise CheckpointError(f"{type(model).__name__} has no encoder to export")
    mae = isinstance(model, MAE) and not backbone_only
    encoder = model.encoder if mae else model.eval_encoder
    _plain_vit(encoder, f"{type(model).__name__}'s encoder")
    enc_state = encoder.export_timm()[1]  # the timm ViT's weights (a mask token dropped)
    if mae:
        decoder = model.decoder
        if not isinstance(decoder, MAEDecoder) or not decoder.cls_token:
            raise CheckpointError(f"{type(model).__name__}'s decoder is not MAE's; use --format hf-vit for the encoder")
        eps = _layer_norm_eps(encoder, decoder)
        block = decoder.blocks[0] if len(decoder.blocks) else None
        ratio = getattr(model.mask_strategy, "ratio", 0.75)
        config = dict(
            architectures=["ViTMAEForPreTraining"],
            model_type="vit_mae",
            **_vit_config(encoder, eps),
            decoder_hidden_size=decoder.embed.out_features,
            decoder_num_hidden_layers=len(decoder.blocks),
            decoder_num_attention_heads=block.attn.num_heads if block else 16,
            decoder_intermediate_size=block.mlp.fc1.out_features if block else 4 * decoder.embed.out_features,
            mask_ratio=hf_mask_ratio(ratio, encoder.patch_embed.num_patches),
            norm_pix_loss=bool(model.norm_pix_loss),
        )
        state = to_hf_state(
            {
                **{f"encoder.{k}": v for k, v in enc_state.items()},
                **{f"decoder.{k}": v for k, v in decoder.state_dict().items()},
            }
        )
    else:
        config = dict(
            architectures=["ViTModel"],
            model_type="vit",
            **_vit_config(encoder, _layer_norm_eps(encoder)),
            encoder_stride=int(encoder.patch_embed.patch_size[0]),
        )
        state = to_hf_state(enc_state, backbone_only=True)
    config["dtype"] = "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(preprocessing), indent=2) + "\n")
    return config["architectures"][0]
