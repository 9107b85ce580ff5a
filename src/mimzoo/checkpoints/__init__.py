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

from mimzoo.checkpoints.convert import exported_kwargs, read_official
from mimzoo.errors import CheckpointError, MissingFileError, user_errors


def read_checkpoint(path, mmap: bool = False,
                    fix: str = "pass a mimzoo checkpoint written by mimzoo-train or mimzoo-import") -> dict:
    """``torch.load`` of a checkpoint file, with a missing, empty or unreadable file reported as such, ending in
    ``fix`` (``mmap``: tensors stay on disk, for a cheap check that the file is whole)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), a save cut short; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors of a truncated or foreign file, whatever their type
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first_sentence(err)}): it is truncated or "
                              f"not a checkpoint; {fix}") from err


def first_sentence(err: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's load errors run to paragraphs)."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text.split('. ')[0]}"[:160]


def _not_a_pretraining_checkpoint(path: Path, ckpt) -> str:
    """What a checkpoint without the 'mimzoo' entry is, and what to pass instead."""
    hp = ckpt.get("hyper_parameters") or {} if isinstance(ckpt, dict) else {}
    linear = {"num_classes", "momentum"} <= set(hp)
    protocol = "fine-tune" if "timm_kwargs" in hp else "linear-probe" if linear else None
    if protocol:
        results = path.parent.parent / "results.json"  # mimzoo-eval's run dir: checkpoints/ and results.json
        source = None
        if results.is_file():
            try:
                source = json.loads(results.read_text()).get("ckpt")
            except (OSError, ValueError):
                pass
        instead = (f"ckpt={source}" if source else
                   "the pre-training checkpoint it was trained on (its results.json: 'ckpt')")
        return (f"{path} is a {protocol} checkpoint written by mimzoo-eval (a classifier), not a pre-training "
                f"checkpoint: pass {instead}")
    return (f"{path} is not a mimzoo checkpoint (no 'mimzoo' entry). For an official checkpoint use "
            f"`mimzoo-import <method> {path} out.ckpt` or mimzoo.load_official(<method>, path)")


def load_pretrained(path, map_location="cpu", purpose: str | None = None):
    """Rebuild the method module a mimzoo checkpoint was written by (``last.ckpt`` or any epoch).

    ``purpose`` (e.g. ``"evaluate"``, ``"export"``) asks for a module with an encoder to use: a stage without
    one (the dVAE tokenizer, ``has_features = False``) is then refused with what to do instead."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get("mimzoo") if isinstance(ckpt, dict) else None
    if not meta:
        raise CheckpointError(_not_a_pretraining_checkpoint(path, ckpt))
    module_name, cls_name = meta["method"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    if purpose and not getattr(cls, "has_features", True):
        raise CheckpointError(
            f"{path} is a {cls_name} checkpoint, a tokenizer stage with no encoder to {purpose}: train BEiT on it "
            f"(mimzoo-train model=beit model.tokenizer.ckpt={path}) and {purpose} that run's checkpoint")
    model = cls(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def export_encoder(ckpt_path, out_path) -> dict:
    """Write the encoder of a mimzoo checkpoint as a plain timm ViT state dict (``out_path``) and the
    ``timm.create_model`` keyword arguments beside it (``out_path`` + ``.json``); returns the kwargs.
    The kwargs hold what the weights cannot tell (``num_heads``...): :func:`load_exported` and
    ``mimzoo-import <method> <out_path>`` read them back."""
    model = load_pretrained(ckpt_path, purpose="export")
    kwargs, state_dict = model.export_timm()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_path)
    Path(f"{out_path}.json").write_text(json.dumps(kwargs, indent=2))
    return kwargs


def load_exported(path):
    """The timm model of a :func:`export_encoder` file (``vit.pth``, with ``vit.pth.json`` beside it), weights
    loaded strictly."""
    import timm

    import mimzoo.nn  # noqa: F401 - registers convmae_convvit with timm

    kwargs = exported_kwargs(path)
    if kwargs is None:
        raise MissingFileError(f"{path}.json is missing: mimzoo-export writes it beside {path} with the "
                               "timm.create_model arguments (head count...) the weights cannot tell; export again "
                               "or copy it along")
    model = timm.create_model(**kwargs)
    model.load_state_dict(read_official(path), strict=True)
    return model


def export_main(argv=None):
    """``mimzoo-export <ckpt> <out>``."""
    parser = argparse.ArgumentParser(prog="mimzoo-export", description="Export a mimzoo encoder as a timm ViT state dict.")
    parser.add_argument("ckpt", help="mimzoo checkpoint (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("out", help="output .pth (timm state dict); kwargs go to <out>.json")
    args = parser.parse_args(argv)
    with user_errors("mimzoo-export"):
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
    with user_errors("mimzoo-import"):
        try:
            out = import_official(args.method, args.src, args.out, **overrides)
        except (FileNotFoundError, ValueError, TypeError) as e:  # a user's mistake: the message, not a traceback
            raise CheckpointError(str(e)) from e
    print(f"wrote {out}; load it with mimzoo.load_pretrained({str(out)!r}) or export it with mimzoo-export")
