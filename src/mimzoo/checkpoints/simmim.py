"""microsoft/SimMIM ViT checkpoints in -> :class:`mimzoo.methods.SimMIM`.

``utils.save_checkpoint`` writes ``{'model': SimMIM.state_dict(), 'optimizer', 'lr_scheduler',
'max_accuracy', 'epoch', 'config'[, 'amp']}``; ``config`` is a yacs ``CfgNode``, read without yacs as nested
dicts (:func:`mimzoo.checkpoints.convert.read_official`). The keys are ours already: ``encoder.*`` as
timm's ``Beit`` (BEiT's ViT), ``decoder.0.*`` the 1x1 convolution; only the persistent
``relative_position_index`` buffers go (checked first). Sizes come from the weights
(:func:`~mimzoo.checkpoints.convert.beit_encoder_sizes`); the head count from the relative position
tables, else from ``config.MODEL.VIT.NUM_HEADS``, else the standard one for the width; the mask from
``config.DATA`` when the file has it.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.beit import method_kwargs, not_beit
from mimzoo.checkpoints.convert import beit_encoder_sizes, drop_relative_position_index, load_strict, model_state

log = logging.getLogger(__name__)

_HINT = (
    "mimzoo-import simmim expects a microsoft/SimMIM ViT pre-training checkpoint (ckpt_epoch_*.pth of "
    "main_simmim.py, simmim_pretrain__vit_*.pth: encoder.* and decoder.0.*). Swin encoders are not supported; "
    "a fine-tuned ViT (no encoder. prefix) is a backbone: `mimzoo-import beit` reads it."
)


def _config(ckpt, *keys):
    """``config.<keys>`` of an official checkpoint, or None."""
    node = ckpt.get("config") if isinstance(ckpt, dict) else None
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


@register_importer("simmim")
def _import_simmim(ckpt, path: str, overrides: dict):
    """microsoft/SimMIM ``SimMIM(VisionTransformerForSimMIM)`` weights -> :class:`SimMIM`."""
    from mimzoo.methods.simmim import SimMIM

    wrong = not_beit(ckpt, None, path, method="simmim")
    if wrong:
        raise ValueError(wrong)
    sd = model_state(ckpt, path)
    if any(k.startswith("encoder.layers.") for k in sd):
        raise ValueError(f"{path} is a SimMIM Swin checkpoint (encoder.layers.*); only SimMIM's ViT is supported")
    encoder_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    wrong = not_beit(ckpt, encoder_sd or sd, path, method="simmim")
    required = ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight", "decoder.0.weight")
    if wrong or any(k not in sd for k in required):
        if not wrong and "patch_embed.proj.weight" in sd:
            wrong = (
                f"{path} is a ViT backbone without SimMIM's encoder./decoder. keys (a fine-tuned model): "
                f"`mimzoo-import beit {path} out.ckpt` reads it for features, evaluation and export"
            )
        raise ValueError(
            wrong or f"{path} is not a SimMIM checkpoint: missing {[k for k in required if k not in sd]}; {_HINT}"
        )
    img_size = (overrides.get("encoder") or {}).get("img_size") or _config(ckpt, "DATA", "IMG_SIZE")
    encoder = beit_encoder_sizes(encoder_sd, path, img_size=img_size)
    if not any(k.endswith("relative_position_bias_table") for k in encoder_sd) and _config(ckpt, "MODEL", "VIT"):
        encoder["num_heads"] = int(_config(ckpt, "MODEL", "VIT", "NUM_HEADS"))
    if encoder["layer_scale_init"] is not None and _config(ckpt, "MODEL", "VIT", "INIT_VALUES"):
        encoder["layer_scale_init"] = float(_config(ckpt, "MODEL", "VIT", "INIT_VALUES"))
    out_channels, patch = sd["decoder.0.weight"].shape[0], encoder["patch_size"]
    if out_channels != patch**2 * encoder["in_chans"]:
        raise ValueError(
            f"{path}: decoder.0.weight predicts {out_channels} values per token, not patch {patch}^2 x "
            f"{encoder['in_chans']} channels; mimzoo's SimMIM needs encoder_stride = patch size "
            "(official ViT configs: 16 with patch 16)"
        )
    hparams = method_kwargs(encoder)
    mask_patch, ratio = _config(ckpt, "DATA", "MASK_PATCH_SIZE"), _config(ckpt, "DATA", "MASK_RATIO")
    if mask_patch and ratio and mask_patch % patch == 0:  # the training mask, when the file records it
        hparams["mask"] = {"name": "random", "ratio": float(ratio), "cell": int(mask_patch) // patch}
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info("SimMIM from %s: %s", path, hparams)
    model = SimMIM(**hparams)
    state = drop_relative_position_index(sd, model.grid_size[0], path)
    return load_strict(model, state, lambda k: k, path, _HINT)
