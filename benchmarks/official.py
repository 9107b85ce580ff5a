"""The official implementations the side-by-side bench times: a user's checkout of each official repository
(``--official-mae PATH`` ...), or else the tests' line-by-line re-statements (``tests/reference_*.py``).

Nothing of the official code is copied here: a checkout is imported from where the user keeps it. Their
import quirks against today's libraries are handled in :func:`checkout`: facebookresearch/mae passes
``qk_scale=None`` to timm's ``Block`` (gone since timm 0.9) and calls ``np.float`` (gone since NumPy 1.24);
bytedance/ibot's ``main_ibot.py`` imports its training-time dependencies (tensorboardX, sklearn, munkres) at
module level, so only its ``iBOTLoss`` class is compiled from it; ``iBOTLoss.update_center`` all-reduces, so
a one-process group is started. Alpha-VL/ConvMAE hard-codes the 224 px ConvMAE-Base grid in its forward.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import math
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimzoo.errors import ConfigError

TESTS = Path(__file__).resolve().parents[1] / "tests"
SOURCES = {"mae": "facebookresearch/mae", "convmae": "Alpha-VL/ConvMAE", "ibot": "bytedance/ibot"}


def reference(name: str):
    """A re-statement module of ``tests/`` (``reference_mae`` ...): the official forward in plain torch ops."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


@contextlib.contextmanager
def _quirks():
    """Today's libraries where the official code expects old ones: ``np.float`` and a timm ``Block`` that
    takes (and ignores, when None) ``qk_scale``; both put back on exit. Their deprecation warnings (timm's
    old import paths, ``weight_norm``) are silenced meanwhile: nothing a user of the bench can act on."""
    import timm.models.vision_transformer as tvt

    had_float, block = hasattr(np, "float"), tvt.Block
    if "qk_scale" not in inspect.signature(block.__init__).parameters:

        class Block(block):  # the same block; qk_scale=None was timm 0.3's default scale
            def __init__(self, *args, qk_scale=None, **kwargs):
                if qk_scale is not None:
                    raise ConfigError("this timm Block has no qk_scale; the official code asks for a custom one")
                super().__init__(*args, **kwargs)

        tvt.Block = Block
    if not had_float:
        np.float = float  # removed in NumPy 1.24; util/pos_embed.py still names it
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, SyntaxWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        tvt.Block = block
        if not had_float:
            del np.float


def checkout(path: str | Path, source: str, modules: list[str]) -> dict:
    """Import ``modules`` from a checkout of ``source`` at ``path``. The checkout's top-level modules leave
    ``sys.modules`` afterwards, so two checkouts with a ``util`` package each do not see each other's."""
    root = Path(path).expanduser().resolve()
    if not (root / (modules[0].replace(".", "/") + ".py")).is_file():
        raise ConfigError(
            f"{root} is not a checkout of {source} (no {modules[0].replace('.', '/')}.py); pass the "
            f"folder of `git clone https://github.com/{source}`"
        )
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        with _quirks():
            return {name: importlib.import_module(name) for name in modules}
    except ImportError as err:
        raise ConfigError(
            f"importing {source} from {root} failed ({err}); install what it names, or drop the "
            "--official-* option to time the re-statement in tests/"
        ) from err
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(root)):
                del sys.modules[name]


def class_from_source(file: Path, name: str, namespace: dict):
    """One class compiled from an official script without running the script's imports."""
    tree = ast.parse(file.read_text(), str(file))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:
        raise ConfigError(f"{file} defines no class {name}: not the bytedance/ibot main_ibot.py the bench knows")
    exec(compile(ast.Module([node], type_ignores=[]), str(file), "exec"), namespace)
    return namespace[name]


def one_process_group(device: str) -> None:
    """``iBOTLoss.update_center`` all-reduces: a world of one makes that the identity."""
    import torch.distributed as dist

    if not dist.is_initialized():  # an in-process store; gloo all-reduces CUDA tensors too
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


# --- MAE and ConvMAE --------------------------------------------------------------------------------------
def mae_module(path, enc: dict, dec: dict) -> nn.Module:
    """facebookresearch/mae ``MaskedAutoencoderViT`` of these sizes (norm-pixel loss, as MAE's recipe)."""
    models_mae = checkout(path, SOURCES["mae"], ["models_mae"])["models_mae"]
    with _quirks():  # np.float is read when the sin-cos table is built
        return models_mae.MaskedAutoencoderViT(
            img_size=enc["img_size"],
            patch_size=enc["patch_size"],
            embed_dim=enc["embed_dim"],
            depth=enc["depth"],
            num_heads=enc["num_heads"],
            decoder_embed_dim=dec["dim"],
            decoder_depth=dec["depth"],
            decoder_num_heads=dec["num_heads"],
            mlp_ratio=4.0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            norm_pix_loss=True,
        )


def convmae_module(path, enc: dict, dec: dict) -> nn.Module:
    """Alpha-VL/ConvMAE ``MaskedAutoencoderConvViT``; its forward is written for 224 px and patches [4, 2, 2]."""
    if enc["img_size"] != 224 or list(enc["patch_size"]) != [4, 2, 2]:
        raise ConfigError(
            f"the official ConvMAE forward hard-codes a 224 px image with patch sizes [4, 2, 2] (its "
            f"14/56/28 grids and patchify's p=16), but this case is {enc['img_size']} px with "
            f"{enc['patch_size']}; use --size gpu, or drop --official-convmae to time the re-statement"
        )
    mods = checkout(path, SOURCES["convmae"], ["models_convmae"])
    p1, p2, _ = enc["patch_size"]
    s = enc["img_size"]
    with _quirks():
        return mods["models_convmae"].MaskedAutoencoderConvViT(
            img_size=[s, s // p1, s // (p1 * p2)],
            patch_size=list(enc["patch_size"]),
            embed_dim=list(enc["embed_dim"]),
            depth=list(enc["depth"]),
            num_heads=enc["num_heads"],
            decoder_embed_dim=dec["dim"],
            decoder_depth=dec["depth"],
            decoder_num_heads=dec["num_heads"],
            mlp_ratio=[4.0, 4.0, 4.0],
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            norm_pix_loss=True,
        )


class Restated(nn.Module):
    """A re-statement's official-format state dict as parameters (``/`` for ``.`` in their names), so an
    optimiser can train it; ``frozen`` names stay buffers (the official sin-cos tables). A tensor listed under
    two names (a shared iBOT head's ``last_layer2`` is its ``last_layer``) stays one parameter."""

    def __init__(self, state: dict, frozen=()):
        super().__init__()
        self.names = list(state)
        first: dict[int, str] = {}
        for name, value in state.items():
            key = name.replace(".", "/")
            if id(value) in first:
                setattr(self, key, getattr(self, first[id(value)]))
            elif name in frozen:
                self.register_buffer(key, value.detach().clone())
            else:
                self.register_parameter(key, nn.Parameter(value.detach().clone()))
            first.setdefault(id(value), key)

    def sd(self) -> dict:
        return {name: getattr(self, name.replace(".", "/")) for name in self.names}


class RestatedMAE(Restated):
    """``reference_mae.forward`` / ``reference_convmae.forward``: ``(loss, pred, mask)`` with noise drawn on the
    device as ``random_masking`` does."""

    def __init__(self, state, ref: str, heads: int, dec_heads: int, grid: int):
        super().__init__(state, frozen=("pos_embed", "decoder_pos_embed"))
        self.ref, self.heads, self.dec_heads, self.grid = ref, heads, dec_heads, grid  # ref: the module's name

    def forward(self, images, mask_ratio=0.75, noise=None):
        if noise is None:
            noise = torch.rand(images.shape[0], self.grid**2, device=images.device)
        with torch.device(images.device):  # the re-statement makes its mask with torch.ones(b, n)
            return reference(self.ref).forward(self.sd(), images, noise, self.heads, self.dec_heads, True, mask_ratio)


# --- iBOT -------------------------------------------------------------------------------------------------
class IBOTStep:
    """One official iBOT training step (``main_ibot.train_one_epoch``, fp32 or under autocast): teacher on the
    global crops, student on the masked global crops, then on the local crops with masking off, ``iBOTLoss``
    with the patch head on every token, ``loss.item()`` and its finiteness check, backward, per-tensor gradient
    clipping (``utils.clip_gradients``), the last-layer freeze, AdamW, the EMA update over common names."""

    def __init__(self, student, teacher, loss, forward, epoch: int, clip: float, freeze_last_layer: int):
        self.student, self.teacher, self.loss, self.forward = student, teacher, loss, forward
        self.epoch, self.clip, self.freeze_last_layer = epoch, clip, freeze_last_layer
        s = dict(student.named_parameters())
        self.ema = [(s[n], p) for n, p in teacher.named_parameters() if n in s]

    def losses(self, crops, masks) -> dict:
        """The loss dict of ``iBOTLoss`` (``loss``, ``cls``, ``patch``)."""
        return self.loss(*self.forward(self.student, self.teacher, crops, masks), masks, self.epoch)

    def step(self, optimizer, crops, masks, autocast) -> torch.Tensor:
        with autocast:
            loss = self.losses(crops, masks)["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"official iBOT loss {loss.item()}")
        optimizer.zero_grad()
        loss.backward()
        for p in self.student.parameters():  # utils.clip_gradients
            if p.grad is not None:
                coef = self.clip / (p.grad.data.norm(2) + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        if self.epoch < self.freeze_last_layer:  # utils.cancel_gradients_last_layer
            for n, p in self.student.named_parameters():
                if "last_layer" in n:
                    p.grad = None
        optimizer.step()
        with torch.no_grad():
            for q, k in self.ema:
                k.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)
        return loss.detach()


def _restated_forward(ref, heads):
    def forward(student, teacher, crops, masks):
        with torch.device(crops[0].device):
            s, t = student.sd(), teacher.sd()
            _, teacher_out = ref.multi_crop_wrapper(t, crops[:2], heads)
            _, student_out = ref.multi_crop_wrapper(s, crops[:2], heads, mask=masks[:2], masked_im_modeling=True)
            local = ref.multi_crop_wrapper(s, crops[2:], heads)[1][0] if len(crops) > 2 else None
        return student_out, teacher_out, local

    return forward


def _module_forward(student, teacher, crops, masks):
    teacher_out = teacher(crops[:2])
    student_out = student(crops[:2], mask=masks[:2])
    local = None
    if len(crops) > 2:
        student.backbone.masked_im_modeling = False
        local = student(crops[2:])[0]
        student.backbone.masked_im_modeling = True
    return student_out, teacher_out, local


def ibot_official(path, ckpt: dict, heads: int, device: str) -> tuple[IBOTStep, dict]:
    """The official step on the weights of ``ckpt`` (a ``main_ibot.py`` checkpoint: what mimzoo imports), from
    a checkout at ``path`` or from ``tests/reference_ibot.py``; returns it and the checkpoint it trains."""
    args = ckpt["args"]
    same_dim = args.shared_head or args.shared_head_teacher
    loss_kwargs = dict(
        out_dim=args.out_dim,
        patch_out_dim=args.out_dim if same_dim else args.patch_out_dim,
        ngcrops=args.global_crops_number,
        nlcrops=args.local_crops_number,
        warmup_teacher_temp=args.warmup_teacher_temp,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp2=args.warmup_teacher_patch_temp,
        teacher_temp2=args.teacher_patch_temp,
        warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
        nepochs=args.epochs,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        mim_start_epoch=args.pred_start_epoch,
    )
    student_sd = {k[len("module.") :]: v for k, v in ckpt["student"].items()}
    centers = ckpt["ibot_loss"]
    if path is None:
        ref = reference("reference_ibot")
        student = Restated(student_sd).to(device)
        teacher = Restated(ckpt["teacher"]).to(device).requires_grad_(False)
        with torch.device(device):
            loss = ref.iBOTLoss(**loss_kwargs)
        loss.center, loss.center2 = centers["center"].to(device), centers["center2"].to(device)
        forward = _restated_forward(ref, heads)
    else:
        mods = checkout(path, SOURCES["ibot"], ["models.vision_transformer", "models.head", "utils"])
        vit, head, utils = mods["models.vision_transformer"], mods["models.head"], mods["utils"]
        one_process_group(device)
        loss_cls = class_from_source(
            Path(path).expanduser() / "main_ibot.py",
            "iBOTLoss",
            dict(torch=torch, nn=nn, F=F, np=np, dist=torch.distributed),
        )

        def build(masked: bool, shared: bool):
            d = ckpt["teacher"]["backbone.pos_embed"].shape[-1]
            p = ckpt["teacher"]["backbone.patch_embed.proj.weight"].shape[-1]
            n = ckpt["teacher"]["backbone.pos_embed"].shape[1] - 1
            depth = 1 + max(int(k.split(".")[2]) for k in ckpt["teacher"] if k.startswith("backbone.blocks."))
            backbone = vit.VisionTransformer(
                img_size=[int(round(n**0.5)) * p],
                patch_size=p,
                embed_dim=d,
                depth=depth,
                num_heads=heads,
                qkv_bias=True,
                drop_path_rate=args.drop_path if masked else 0.0,
                return_all_tokens=True,
                masked_im_modeling=masked,
            )
            w = ckpt["teacher"]["head.mlp.0.weight"]
            bottleneck = ckpt["teacher"]["head.last_layer.weight_v"].shape[1]
            return utils.MultiCropWrapper(
                backbone,
                head.iBOTHead(
                    d,
                    args.out_dim,
                    patch_out_dim=loss_kwargs["patch_out_dim"],
                    norm=args.norm_in_head,
                    act=args.act_in_head,
                    hidden_dim=w.shape[0],
                    bottleneck_dim=bottleneck,
                    norm_last_layer=args.norm_last_layer,
                    shared_head=shared,
                ),
            )

        with _quirks():
            student, teacher = build(True, args.shared_head), build(False, args.shared_head_teacher)
        student.load_state_dict(student_sd)
        teacher.load_state_dict(ckpt["teacher"])
        student, teacher = student.to(device), teacher.to(device).requires_grad_(False)
        loss = loss_cls(**loss_kwargs).to(device)
        loss.center.copy_(centers["center"])
        loss.center2.copy_(centers["center2"])
        forward = _module_forward
    return IBOTStep(student, teacher, loss, forward, ckpt["epoch"], args.clip_grad, args.freeze_last_layer)
