"""Checkpoints in and out: mimzoo checkpoints back into their method, encoders out to timm."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

TIMM_ARCH = "vit_base_patch16_224"  # any timm ViT name; the exported kwargs set every size


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
    kwargs = {"model_name": TIMM_ARCH, "pretrained": False, "num_classes": 0, "global_pool": "token", **kwargs}
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
