"""facebookresearch/mae checkpoints in: ``MaskedAutoencoderViT`` weights -> :class:`mimzoo.methods.MAE`.

Also MAE's decoder names and sizes, which ConvMAE (:mod:`mimzoo.checkpoints.convmae`) shares."""

from __future__ import annotations

import logging
import warnings

from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import load_strict, model_state, num_blocks, official_args, rename, vit_encoder_sizes

log = logging.getLogger(__name__)

# official name prefix -> ours (decoder entries first, so "blocks." never eats "decoder_blocks.")
DECODER_RENAMES = (
    ("decoder_embed.", "decoder.embed."),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("mask_token", "decoder.mask_token"),
)
_RENAMES = DECODER_RENAMES + (
    ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"),
    ("patch_embed.", "encoder.patch_embed."),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
)
_HINT = (
    "mimzoo-import mae expects a facebookresearch/mae pre-training checkpoint (mae_pretrain_vit_*.pth, "
    "mae_visualize_*.pth or a main_pretrain.py checkpoint-*.pth). Fine-tuned classifiers (head.*, fc_norm.*) and "
    "other methods' files (BEiT, iBOT, timm) are not MAE pre-training checkpoints: use that method's importer. "
    "Shape mismatches come from overrides that contradict the weights (drop them) or from another architecture."
)


def _official_name(key: str) -> str:
    return rename(key, [(new, old) for old, new in _RENAMES])


def decoder_sizes(sd: dict) -> tuple[bool, dict]:
    """Whether an official MAE-style file has decoder weights, and the decoder sizes they fix
    (MAE's 512 x 8, 16 heads where absent; heads are not in the weights)."""
    has_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in sd)
    decoder = dict(dim=512, depth=8, num_heads=16, mlp_ratio=4.0)
    if "decoder_embed.weight" in sd:
        d_dim = sd["decoder_embed.weight"].shape[0]
        decoder.update(dim=d_dim, depth=num_blocks(sd, "decoder_blocks."))
        if "decoder_blocks.0.mlp.fc1.weight" in sd:
            decoder["mlp_ratio"] = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / d_dim
    return has_decoder, decoder


@register_importer("mae")
def _import_mae(ckpt, path: str, overrides: dict):
    """facebookresearch/mae ``MaskedAutoencoderViT`` weights -> :class:`mimzoo.methods.MAE`."""
    from mimzoo.methods.mae import MAE

    sd = model_state(ckpt, path)
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in required):
        unknown = sorted(k for k in sd if rename(k, _RENAMES) == k)
        raise ValueError(
            f"{path} is not an MAE checkpoint: missing {[k for k in required if k not in sd]}"
            f"{f'; unknown keys {unknown[:8]}' if unknown else ''}\n{_HINT}"
        )
    encoder = vit_encoder_sizes(sd, path, (overrides.get("encoder") or {}).get("num_heads"))
    has_decoder, decoder = decoder_sizes(sd)
    args = official_args(ckpt)
    npl_from = "override" if "norm_pix_loss" in overrides else "args" if hasattr(args, "norm_pix_loss") else None
    hparams = dict(encoder=encoder, decoder=decoder, norm_pix_loss=getattr(args, "norm_pix_loss", True))
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info(
        "MAE from %s: encoder %s, decoder %s, norm_pix_loss=%s (%s)",
        path,
        hparams["encoder"],
        hparams["decoder"],
        hparams["norm_pix_loss"],
        npl_from
        or "default: not recorded in the file; "
        "mae_visualize_* were trained without it, pass norm_pix_loss=false for them",
    )
    model = MAE(**hparams)
    state = {rename(k, _RENAMES): v for k, v in sd.items()}
    if not has_decoder:  # released mae_pretrain_vit_*.pth carry the encoder only
        warnings.warn(
            f"{path} has no decoder weights (encoder-only release); the decoder {hparams['decoder']} is "
            "freshly initialised, so reconstructions and the loss are meaningless until it is trained",
            stacklevel=3,
        )
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    return load_strict(model, state, _official_name, path, _HINT)
