"""Checkpoints in and out: mimzoo checkpoints back into their method, encoders out to timm (and, through
:mod:`mimzoo.checkpoints.hf`, to Hugging Face transformers), and official repositories' checkpoints in.

Each official source is one module of this package (``mae``, ``ibot``, ``convmae``, ``beit``, ``simmim``,
``hf``), found by name:
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
from collections.abc import Callable
from pathlib import Path

import lightning
import torch
from omegaconf import OmegaConf

from mimzoo.checkpoints.convert import exported_kwargs, read_official
from mimzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimzoo.errors import CheckpointError, MissingFileError, user_errors


def read_checkpoint(
    path, mmap: bool = False, fix: str = "pass a mimzoo checkpoint written by mimzoo-train or mimzoo-import"
) -> dict:
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
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({first_sentence(err)}): it is truncated or "
            f"not a checkpoint; {fix}"
        ) from err


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
        instead = (
            f"ckpt={source}" if source else "the pre-training checkpoint it was trained on (its results.json: 'ckpt')"
        )
        return (
            f"{path} is a {protocol} checkpoint written by mimzoo-eval (a classifier), not a pre-training "
            f"checkpoint: pass {instead}"
        )
    return (
        f"{path} is not a mimzoo checkpoint (no 'mimzoo' entry). For an official checkpoint use "
        f"`mimzoo-import <method> {path} out.ckpt` or mimzoo.load_official(<method>, path)"
    )


def _read_mimzoo(path) -> dict:
    """The raw dict of a mimzoo checkpoint (weights, ``hyper_parameters``, the data module's, ``mimzoo``)."""
    ckpt = read_checkpoint(path)
    if not (ckpt.get("mimzoo") if isinstance(ckpt, dict) else None):
        raise CheckpointError(_not_a_pretraining_checkpoint(Path(path), ckpt))
    return ckpt


def _build(ckpt: dict, path, purpose: str | None = None):
    """The method module of a checkpoint :func:`_read_mimzoo` read; ``purpose`` as :func:`load_pretrained`."""
    module_name, cls_name = ckpt["mimzoo"]["method"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    if purpose and not cls.has_features:
        raise CheckpointError(
            f"{path} is a {cls_name} checkpoint, a tokenizer stage with no encoder to {purpose}: train BEiT on it "
            f"(mimzoo-train model=beit model.tokenizer.ckpt={path}) and {purpose} that run's checkpoint"
        )
    model = cls(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def load_pretrained(path, map_location="cpu", purpose: str | None = None):
    """Rebuild the method module a mimzoo checkpoint was written by (``last.ckpt`` or any epoch).

    ``purpose`` (e.g. ``"evaluate"``, ``"export"``) asks for a module with an encoder to use: a stage without
    one (the dVAE tokenizer, ``has_features = False``) is then refused with what to do instead."""
    return _build(_read_mimzoo(path), path, purpose)


# --- exports ----------------------------------------------------------------------------------
# What the exports share: the architecture name (timm's own name where the sizes are one of its models)
# and the preprocessing the encoder was trained with, so the exported model carries both.

PAPER_PREPROCESSING = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic")
# timm's size word of a (width, depth, heads, MLP ratio); a name is used only where timm registers it
_TIMM_SIZES = {
    (192, 12, 3, 4.0): "tiny",
    (384, 12, 6, 4.0): "small",
    (768, 12, 12, 4.0): "base",
    (1024, 24, 16, 4.0): "large",
    (1280, 32, 16, 4.0): "huge",
}


def timm_model_name(kwargs: dict) -> str:
    """The timm architecture name of an export: ``<family>_<size>_patch<p>_<img>`` (``vit_small_patch16_224``,
    ``beit_base_patch16_224``...) where timm registers that name for these sizes, else the encoder's generic
    name (which only picks the class; the kwargs set every size). The one place this choice is made."""
    import timm

    generic = kwargs["model_name"]
    family = generic.split("_")[0]
    if family not in ("vit", "beit"):  # e.g. ConvMAE's convmae_convvit, sized per stage
        return generic
    size = _TIMM_SIZES.get(
        (kwargs.get("embed_dim"), kwargs.get("depth"), kwargs.get("num_heads"), float(kwargs.get("mlp_ratio", 4.0)))
    )
    if size is None or kwargs.get("in_chans", 3) != 3:
        return generic
    name = f"{family}_{size}_patch{kwargs.get('patch_size')}_{kwargs.get('img_size')}"
    return name if timm.is_model(name) else generic


def training_preprocessing(ckpt: dict, model) -> dict:
    """The evaluation preprocessing of the data a checkpoint was trained on, as timm's ``pretrained_cfg``
    fields (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) plus ``notes`` saying where
    it comes from: the data module's hyper-parameters a training run stores in its checkpoints, else (an
    imported official checkpoint) the papers' ImageNet default (mean/std, crop 0.875, bicubic)."""
    encoder = model.eval_encoder
    size = tuple(int(s) for s in model.image_size)
    data = ckpt.get("datamodule_hyper_parameters")
    if data and all(k in data for k in ("mean", "std", "crop_pct")):
        pre = dict(mean=data["mean"], std=data["std"], crop_pct=data["crop_pct"], interpolation="bicubic")
        notes = f"preprocessing of the training data ({data.get('name', '?')}, eval transform: resize, centre crop)"
    else:
        pre = dict(PAPER_PREPROCESSING)
        source = ckpt.get("mimzoo", {}).get("imported_from")
        notes = (
            "paper default preprocessing (ImageNet mean/std, crop 0.875, bicubic): the checkpoint records no "
            f"data settings ({'imported from ' + str(source) if source else 'no data module saved'})"
        )
    return dict(
        input_size=(int(encoder.in_chans), *size),
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
        crop_pct=float(pre["crop_pct"]),
        interpolation=pre["interpolation"],
        notes=notes,
    )


def export_encoder(ckpt_path, out_path) -> dict:
    """Write the encoder of a mimzoo checkpoint as a plain timm state dict (``out_path``) and the
    ``timm.create_model`` keyword arguments beside it (``out_path`` + ``.json``); returns the kwargs.

    The kwargs name timm's architecture where the sizes are one of its models (:func:`timm_model_name`) and
    carry the training preprocessing as ``pretrained_cfg_overlay`` (:func:`training_preprocessing`), so
    ``timm.data.resolve_data_config({}, model=timm.create_model(**kwargs))`` gives it back. The kwargs also
    hold what the weights cannot tell (``num_heads``...): :func:`load_exported` and
    ``mimzoo-import <method> <out_path>`` read them back."""
    ckpt = _read_mimzoo(ckpt_path)
    model = _build(ckpt, ckpt_path, purpose="export")
    kwargs, state_dict = model.export_timm()
    overlay = {**training_preprocessing(ckpt, model), "hf_hub_id": None, "tag": None}  # not timm's released weights
    kwargs = {**kwargs, "model_name": timm_model_name(kwargs), "pretrained_cfg_overlay": overlay}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_path)
    Path(f"{out_path}.json").write_text(json.dumps(kwargs, indent=2))
    return kwargs


def export_hf(ckpt_path, out_dir, backbone_only: bool = False) -> str:
    """Write a mimzoo checkpoint as a Hugging Face ``save_pretrained`` directory; returns the class written.

    MAE (a ViT encoder with MAE's decoder) -> ``ViTMAEForPreTraining``; any other method whose evaluation
    encoder is a plain ViT (iBOT's teacher, SG-MAE...), or MAE with ``backbone_only`` -> ``ViTModel``.
    Needs no transformers; see :mod:`mimzoo.checkpoints.hf`."""
    from mimzoo.checkpoints import hf

    ckpt = _read_mimzoo(ckpt_path)
    model = _build(ckpt, ckpt_path, purpose="export")
    return hf.save_hf(model, out_dir, training_preprocessing(ckpt, model), backbone_only=backbone_only)


def load_exported(path):
    """The timm model of a :func:`export_encoder` file (``vit.pth``, with ``vit.pth.json`` beside it), weights
    loaded strictly."""
    import timm

    import mimzoo.nn  # noqa: F401 - registers convmae_convvit with timm

    kwargs = exported_kwargs(path)
    if kwargs is None:
        raise MissingFileError(
            f"{path}.json is missing: mimzoo-export writes it beside {path} with the "
            "timm.create_model arguments (head count...) the weights cannot tell; export again "
            "or copy it along"
        )
    model = timm.create_model(**kwargs)
    model.load_state_dict(read_official(path), strict=True)
    return model


def export_main(argv=None):
    """``mimzoo-export <ckpt> <out> [--format timm|hf|hf-vit]``."""
    parser = argparse.ArgumentParser(
        prog="mimzoo-export",
        description="Export a mimzoo encoder as a timm ViT state dict or a Hugging Face transformers directory.",
    )
    parser.add_argument("ckpt", help="mimzoo checkpoint (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument(
        "out", help="timm: output .pth (state dict; kwargs go to <out>.json); hf, hf-vit: output directory"
    )
    parser.add_argument(
        "--format",
        choices=("timm", "hf", "hf-vit"),
        default="timm",
        help="timm (default); hf: ViTMAEForPreTraining for MAE, ViTModel for other ViT encoders; "
        "hf-vit: ViTModel (the backbone only)",
    )
    args = parser.parse_args(argv)
    with user_errors("mimzoo-export"):
        if args.format == "timm":
            kwargs = export_encoder(args.ckpt, args.out)
        else:
            cls = export_hf(args.ckpt, args.out, backbone_only=args.format == "hf-vit")
    if args.format == "timm":
        print(
            f"wrote {args.out} and {args.out}.json ({kwargs['model_name']}; "
            f"{kwargs['pretrained_cfg_overlay']['notes']}); load it with:\n"
            f"  model = timm.create_model(**json.load(open({args.out + '.json'!r})))\n"
            f"  model.load_state_dict(torch.load({args.out!r}), strict=True)\n"
            f"  data_cfg = timm.data.resolve_data_config({{}}, model=model)  # input size, mean, std, crop"
        )
    else:
        extra = ", add_pooling_layer=False" if cls == "ViTModel" else ""
        print(
            f"wrote {args.out}/ ({cls}); load it with:\n"
            f"  model = transformers.{cls}.from_pretrained({args.out!r}{extra})\n"
            f"  processor = transformers.AutoImageProcessor.from_pretrained({args.out!r})"
        )


# --- official checkpoints in ------------------------------------------------------------------
# One importer per source: ``importer(ckpt, path, overrides) -> module``. ``ckpt`` is whatever the
# official repository saved (read safely by :func:`convert.read_official`); each importer maps its keys
# onto our module and loads them with ``strict=True`` through :func:`convert.load_strict`.

_IMPORTERS: dict[str, Callable] = {}
_HELPERS = {"convert"}  # modules of this package that are not sources


def register_importer(method: str, read: Callable = read_official):
    """Decorator adding an official-format importer for ``method`` (``mae``, later ``beit``...); ``read``
    turns the user's path into what the importer gets (a ``save_pretrained`` directory for ``hf``)."""

    def deco(fn):
        fn.read = read
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
    importer = _importer(method)
    return importer(importer.read(path), str(path), model_overrides).eval()


def import_official(method: str, src, out_ckpt, **model_overrides) -> Path:
    """Convert an official checkpoint into a mimzoo checkpoint that :func:`load_pretrained` reads."""
    model = load_official(method, src, **model_overrides)
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }  # so ``MAE.load_from_checkpoint`` works too
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
        prog="mimzoo-import",
        description="Convert an official checkpoint into a mimzoo checkpoint.",
        epilog="overrides use dotted keys, e.g. norm_pix_loss=false encoder.num_heads=12 decoder.num_heads=16",
    )
    parser.add_argument("method", choices=known_sources())
    parser.add_argument(
        "src", help="official checkpoint, e.g. mae_pretrain_vit_base.pth (hf: a save_pretrained directory)"
    )
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
