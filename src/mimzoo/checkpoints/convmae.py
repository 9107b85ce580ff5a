"""Alpha-VL/ConvMAE checkpoints in: ``MaskedAutoencoderConvViT`` weights -> :class:`mimzoo.methods.ConvMAE`.

The decoder is MAE's, under MAE's names (:mod:`mimzoo.checkpoints.mae`); every other official key
is ``encoder.<key>``."""

from __future__ import annotations

import logging
import warnings

from omegaconf import OmegaConf

from mimzoo.checkpoints import register_importer
from mimzoo.checkpoints.convert import (
    block_sizes,
    load_strict,
    model_state,
    official_args,
    rename,
    square_grid,
    standard_heads,
)
from mimzoo.checkpoints.mae import DECODER_RENAMES, decoder_sizes

log = logging.getLogger(__name__)

_HINT = (
    "mimzoo-import convmae expects an Alpha-VL/ConvMAE pre-training checkpoint (MaskedAutoencoderConvViT: "
    "patch_embed1..4, blocks1..3, stage1_output_decode, stage2_output_decode, decoder_*). Fine-tuned ConvViT "
    "classifiers (head.*, fc_norm.*) lack the fusion convs and are not pre-training checkpoints."
)


def _ours(key: str) -> str:
    new = rename(key, DECODER_RENAMES)
    return new if new != key else f"encoder.{key}"


def _official_name(key: str) -> str:
    old = rename(key, [(new, old) for old, new in DECODER_RENAMES])
    return old[len("encoder.") :] if old.startswith("encoder.") else old


@register_importer("convmae")
def _import_convmae(ckpt, path: str, overrides: dict):
    """Alpha-VL/ConvMAE ``MaskedAutoencoderConvViT`` weights -> :class:`mimzoo.methods.ConvMAE`."""
    from mimzoo.methods.convmae import ConvMAE

    sd = model_state(ckpt, path)
    required = [f"patch_embed{i}.proj.weight" for i in (1, 2, 3)] + [
        "patch_embed4.weight",
        "pos_embed",
        "blocks3.0.mlp.fc1.weight",
    ]
    if any(k not in sd for k in required):
        raise ValueError(f"{path} is not a ConvMAE checkpoint: missing {[k for k in required if k not in sd]}\n{_HINT}")
    convs = [sd[f"patch_embed{i}.proj.weight"] for i in (1, 2, 3)]
    dims = [int(w.shape[0]) for w in convs]
    patches = [int(w.shape[-1]) for w in convs]
    grid = square_grid(sd["pos_embed"].shape[1], [w.shape[-2:] for w in convs], path)  # no class slot
    depth, mlp_ratio = zip(*(block_sizes(sd, f"blocks{i + 1}.", dims[i]) for i in range(3)))
    encoder = dict(
        img_size=grid * patches[0] * patches[1] * patches[2],
        patch_size=patches,
        embed_dim=dims,
        depth=list(depth),
        num_heads=standard_heads(dims[2]),
        mlp_ratio=list(mlp_ratio),
        in_chans=int(convs[0].shape[1]),
    )
    has_decoder, decoder = decoder_sizes(sd)
    args = official_args(ckpt)
    hparams = dict(encoder=encoder, decoder=decoder, norm_pix_loss=getattr(args, "norm_pix_loss", True))
    hparams = OmegaConf.to_container(OmegaConf.merge(hparams, overrides))
    log.info(
        "ConvMAE from %s: encoder %s, decoder %s, norm_pix_loss=%s",
        path,
        hparams["encoder"],
        hparams["decoder"],
        hparams["norm_pix_loss"],
    )
    model = ConvMAE(**hparams)
    state = {_ours(k): v for k, v in sd.items()}
    if not has_decoder:
        warnings.warn(
            f"{path} has no decoder weights; the decoder {hparams['decoder']} is freshly initialised, "
            "so reconstructions and the loss are meaningless until it is trained",
            stacklevel=3,
        )
        state.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    return load_strict(model, state, _official_name, path, _HINT)
