"""Checkpoints in and out: mimzoo checkpoints back into their method, encoders out to timm, and
official repositories' checkpoints in.

Each official source is one module of this package (``mae``, ``ibot``, ``convmae``), found by name:
``load_official("mae", ...)`` imports :mod:`mimzoo.checkpoints.mae`, whose importer registers itself
with :func:`register_importer`. Adding a source is adding a module; :mod:`mimzoo.checkpoints.convert`
holds what the converters share.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
from pathlib import Path
from typing import Callable

import lightning
import torch
from omegaconf import OmegaConf

from mimzoo.checkpoints.convert import read_official


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
# One importer per source: ``importer(ckpt, path, overrides) -> module``. ``ckpt`` is whatever the
# official repository saved (read safely by :func:`convert.read_official`); each importer maps its keys
# onto our module and loads them with ``strict=True`` through :func:`convert.load_strict`.

_IMPORTERS: dict[str, Callable] = {}
_HELPERS = {"convert"}  # modules of this package that are not sources


def register_importer(method: str):
    """Decorator adding an official-format importer for ``method`` (``mae``, later ``beit``...)."""

    def deco(fn):
        _IMPORTERS[method] = fn
        return fn

    return deco


def known_sources() -> list[str]:
    """Every source with an importer: this package's modules (bar the helpers) and any registered elsewhere."""
    modules = {m.name for m in pkgutil.iter_modules(__path__) if m.name not in _HELPERS and not m.name.startswith("_")}
    return sorted(modules | set(_IMPORTERS))


def _importer(method: str) -> Callable:
    if method not in _IMPORTERS and method in known_sources():
        importlib.import_module(f"{__name__}.{method}")  # registers itself
    if method not in _IMPORTERS:
        raise KeyError(f"no official importer for {method!r}; known: {', '.join(known_sources())}")
    return _IMPORTERS[method]


def load_official(method: str, path, **model_overrides):
    """Load an official repository's checkpoint into the matching mimzoo module (eval mode).

    What the weights fix (widths, depths, patch and image size) is inferred; ``model_overrides``
    are the method's constructor arguments, merged over the inferred ones, e.g.
    ``load_official("mae", p, encoder={"num_heads": 12}, decoder={"num_heads": 16}, norm_pix_loss=False)``.
    """
    return _importer(method)(read_official(path), str(path), model_overrides).eval()


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
    parser.add_argument("method", choices=known_sources())
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
