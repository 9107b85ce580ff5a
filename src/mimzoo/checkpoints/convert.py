"""What every official-checkpoint converter shares: reading the file safely, finding its state dict,
renaming keys, inferring a ViT's sizes from its weights, and a strict load whose errors name the
official keys. Pure helpers; the importers are the other modules of this package, one per source."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from mimzoo.errors import CheckpointError, MissingFileError

log = logging.getLogger(__name__)

_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-T/S/B/L/H


class _YacsConfig:
    """Stand-in for yacs' ``CfgNode`` (the ``config`` microsoft/SimMIM's ``utils.save_checkpoint`` saves):
    read as an ``OrderedDict`` of its keys, without yacs and without running any of its code."""

    def __new__(cls, *args):
        return OrderedDict()


def read_official(path):
    """``torch.load`` without arbitrary unpickling; ``argparse.Namespace`` (official ``args``) is allowed and
    a yacs ``CfgNode`` (official ``config``) is read as nested ``OrderedDict``s. An unreadable file is a
    ``ValueError`` saying so."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): download or copy it again")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, (_YacsConfig, "yacs.config.CfgNode")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in pickle or zip, whatever the type
        found = re.search(r"(Unsupported [^\n]*?)(?: was not an allowed global by default|\n|$)", str(err))
        why = (
            found.group(1).strip()
            if found
            else "empty or truncated"
            if isinstance(err, EOFError)
            else "not written by torch.save"
            if isinstance(err, KeyError)
            else f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0].split('. ')[0][:140]}"
        )
        raise CheckpointError(
            f"{path} is not a checkpoint torch.load can read safely ({why}); pass the .pth file "
            "the official training script or release wrote (if it is cut short: download or copy "
            "it again)"
        ) from err
    if isinstance(ckpt, dict) and "mimzoo" in ckpt:
        raise ValueError(f"{path} is already a mimzoo checkpoint; load it with mimzoo.load_pretrained")
    return ckpt


def exported_kwargs(path) -> dict | None:
    """The ``timm.create_model`` kwargs ``mimzoo-export`` wrote beside ``path`` (``<path>.json``), if any: they
    hold what a state dict cannot tell, the head count first."""
    sidecar = Path(f"{path}.json")
    if not sidecar.is_file():
        return None
    try:
        kwargs = json.loads(sidecar.read_text())
    except ValueError as err:
        raise CheckpointError(f"{sidecar} is not valid JSON ({err}); write it again with mimzoo-export") from err
    return kwargs if isinstance(kwargs, dict) and "model_name" in kwargs else None


def model_state(ckpt, path: str) -> dict:
    """The state dict of an official checkpoint: under ``"model"`` (training/release files) or bare."""
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a state dict, or a dict with one under 'model'; found {keys}")
    return sd


def official_args(ckpt):
    """The ``args`` namespace an official training script saved beside the weights, if any."""
    return ckpt.get("args") if isinstance(ckpt, dict) else None


def rename(key: str, pairs) -> str:
    """``key`` with the first matching ``(old, new)`` applied: a whole key, or a prefix when ``old`` ends in '.'."""
    for old, new in pairs:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return key


def num_blocks(sd: dict, prefix: str) -> int:
    """How many ``<prefix><i>.`` blocks the state dict holds."""
    return 1 + max((int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


def standard_heads(dim: int) -> int:
    """The head count of the standard ViT of this width (T/S/B/L/H), else one head per 64 channels;
    heads are not in the weights, so an override is needed for anything else."""
    return _STANDARD_HEADS.get(dim, max(1, dim // 64))


def square_grid(num_positions: int, patch_shapes, path: str) -> int:
    """The side of the square grid of ``num_positions`` patches; every ``(h, w)`` patch must be square."""
    patch_shapes = [tuple(int(s) for s in hw) for hw in patch_shapes]
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions or any(h != w for h, w in patch_shapes):
        shown = ", ".join(f"{h}x{w}" for h, w in patch_shapes)
        raise ValueError(
            f"{path}: only square patches on a square grid are supported "
            f"(patch {shown}, {num_positions} position slots)"
        )
    return grid


def block_sizes(sd: dict, prefix: str, dim: int) -> tuple[int, float]:
    """Depth and MLP ratio of the ``<prefix><i>.`` blocks of width ``dim`` (ratio 4 when there are none)."""
    depth = num_blocks(sd, prefix)
    return depth, sd[f"{prefix}0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0


def heads_for(dim: int, path: str, given: int | None = None) -> int:
    """The head count of a ``dim``-wide encoder in ``path``: ``given`` (an override), else the ``<path>.json``
    mimzoo-export writes beside its weights, else the standard ViT's for that width (with a warning when the
    width is not a standard one)."""
    if given:
        return int(given)
    exported = exported_kwargs(path)
    if exported and exported.get("num_heads") and exported.get("embed_dim") in (None, dim):
        log.info("num_heads=%s from %s.json (mimzoo-export)", exported["num_heads"], path)
        return int(exported["num_heads"])
    if dim not in _STANDARD_HEADS:
        warnings.warn(
            f"{path}: the weights do not tell the head count; {standard_heads(dim)} assumed for width {dim} "
            "(no standard ViT has it). Pass encoder.num_heads=<heads> if it was trained with another",
            stacklevel=3,
        )
    return standard_heads(dim)


def vit_encoder_sizes(sd: dict, path: str, num_heads: int | None = None) -> dict:
    """The ViT encoder keyword arguments a timm-named ViT state dict fixes (``patch_embed.proj``,
    ``pos_embed`` with a class slot, ``blocks.<i>``); the head count is :func:`heads_for`'s (``num_heads``: the
    user's override)."""
    dim, in_chans, *patch = sd["patch_embed.proj.weight"].shape
    grid = square_grid(sd["pos_embed"].shape[1] - 1, [patch], path)
    depth, mlp_ratio = block_sizes(sd, "blocks.", dim)
    return dict(
        img_size=grid * patch[0],
        patch_size=patch[0],
        embed_dim=dim,
        depth=depth,
        num_heads=heads_for(dim, path, num_heads),
        mlp_ratio=mlp_ratio,
        in_chans=in_chans,
    )


def _grid_from_table(rows: int) -> int | None:
    """The side ``g`` of a square grid whose relative position table has ``(2g - 1)^2 + 3`` rows."""
    side = math.isqrt(max(rows - 3, 0))
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 == 1 else None


def beit_encoder_sizes(sd: dict, path: str, img_size: int | None = None) -> dict:
    """The :class:`~mimzoo.nn.BEiTEncoder` keyword arguments a BEiT-style ViT state dict fixes (keys as
    timm's ``Beit``, BEiT's and SimMIM's ``VisionTransformer``: ``patch_embed.proj``, ``blocks.<i>`` with
    ``attn.q_bias``/``v_bias``, optional ``pos_embed``, ``gamma_1``, shared ``rel_pos_bias.*`` or per-block
    ``attn.relative_position_*``, ``norm`` or ``fc_norm``).

    The grid comes from every place that tells it and must agree: ``pos_embed`` (one class slot), a
    ``relative_position_index`` (``[1 + N, 1 + N]``) and a ``relative_position_bias_table``
    (``(2g - 1)^2 + 3`` rows); with none of them (no positions at all) ``img_size`` must be given. The head
    count is the tables' second dimension, else the standard one for the width. Layer scale, absolute
    positions, shared or per-block tables and mean pooling (``fc_norm``) are read from which keys exist;
    the layer-scale *initial* value is not in the weights (0.1, BEiT's default, when gammas exist).
    """
    dim, in_chans, *patch = sd["patch_embed.proj.weight"].shape
    tables = [
        k
        for k in ("rel_pos_bias.relative_position_bias_table", "blocks.0.attn.relative_position_bias_table")
        if k in sd
    ]
    grids = {}
    if "pos_embed" in sd:
        grids["pos_embed"] = square_grid(sd["pos_embed"].shape[1] - 1, [patch], path)
    for key in (k for k in sd if k.endswith("relative_position_index")):
        grids[key] = square_grid(sd[key].shape[0] - 1, [patch], path)
    for key in tables:
        grids[key] = _grid_from_table(sd[key].shape[0])
        if grids[key] is None:
            raise ValueError(f"{path}: {key} has {sd[key].shape[0]} rows, not (2g - 1)^2 + 3 for a square g x g grid")
    if len(set(grids.values())) > 1:
        shown = ", ".join(f"{k}: {g}x{g}" for k, g in grids.items())
        raise ValueError(f"{path}: the position tensors disagree on the patch grid ({shown})")
    if grids:
        img_size = next(iter(grids.values())) * patch[0]
    elif img_size is None:
        raise ValueError(
            f"{path} has no position tensor (no pos_embed, no relative position table) to tell the "
            "image size; pass it: encoder.img_size=224 (encoder={'img_size': 224})"
        )
    square_grid(1, [patch], path)  # square patches
    heads = {int(sd[k].shape[1]) for k in tables}
    if len(heads) > 1:
        raise ValueError(f"{path}: the relative position tables disagree on the head count ({sorted(heads)})")
    depth, mlp_ratio = block_sizes(sd, "blocks.", dim)
    return dict(
        img_size=int(img_size),
        patch_size=int(patch[0]),
        embed_dim=int(dim),
        depth=depth,
        num_heads=heads.pop() if heads else standard_heads(dim),
        mlp_ratio=mlp_ratio,
        in_chans=int(in_chans),
        layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else None,
        use_abs_pos_emb="pos_embed" in sd,
        use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
        use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
        global_pool="avg" if "fc_norm.weight" in sd else "token",
    )


def drop_relative_position_index(sd: dict, grid: int, path: str, prefix: str = "") -> dict:
    """``sd`` without the ``relative_position_index`` buffers (persistent in BEiT's and SimMIM's code,
    not in timm's), each checked to be the index timm builds for the ``grid x grid`` patch grid."""
    from timm.models.beit import gen_relative_position_index

    expected = gen_relative_position_index((grid, grid))
    out = {}
    for k, v in sd.items():
        if not k.endswith("relative_position_index"):
            out[k] = v
        elif not torch.equal(v.long(), expected):
            raise ValueError(
                f"{path}: {prefix}{k} is not the relative position index of a {grid}x{grid} patch grid; "
                "the file was not written by BEiT/SimMIM/timm code for this grid"
            )
    return out


def load_strict(model, state: dict, official_name: Callable[[str], str], path: str, hint: str):
    """``load_state_dict(strict=True)``, with mismatches reported under the official key names."""
    ours = model.state_dict()
    unexpected = sorted(official_name(k) for k in state.keys() - ours.keys())
    missing = sorted(official_name(k) for k in ours.keys() - state.keys())
    shapes = sorted(
        f"{official_name(k)} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and v.shape != ours[k].shape
    )
    if unexpected or missing or shapes:

        def show(name, keys):
            return f"\n  {name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" if keys else ""

        raise ValueError(
            f"{path} does not match {type(model).__name__}:"
            + show("unexpected keys", unexpected)
            + show("missing keys", missing)
            + show("shape mismatches", shapes)
            + f"\n{hint}"
        )
    model.load_state_dict(state, strict=True)
    return model
