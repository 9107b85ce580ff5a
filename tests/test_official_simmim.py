"""Official SimMIM checkpoints in: a microsoft/SimMIM ViT checkpoint, written as ``utils.save_checkpoint``
writes it (``model``, ``optimizer``, ``lr_scheduler``, ``max_accuracy``, ``epoch``, the yacs ``config``,
``amp``), gives ``reference_simmim.official_simmim_loss`` and its reconstruction on the same weights and
mask, through ``load_official("simmim")`` and ``mimzoo-import simmim``; wrong files name the importer."""

import re
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch

import reference_simmim as ref
from mimzoo.checkpoints import import_main, load_official, load_pretrained
from mimzoo.checkpoints.convert import read_official
from mimzoo.methods import SimMIM

IMG, P, D, DEPTH, HEADS, MASK_PATCH = 32, 4, 32, 2, 2, 8
GRID = IMG // P

VARIANTS = {  # config.MODEL.VIT options (USE_APE, USE_RPB, USE_SHARED_RPB, USE_MEAN_POOLING, INIT_VALUES)
    "vit_base_recipe": dict(
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
        use_mean_pooling=False,
        init_values=0.1,
    ),
    "per_block_abs_mean_pool": dict(
        use_abs_pos_emb=True,
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        use_mean_pooling=True,
        init_values=0.1,
    ),
    "abs_only": dict(
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=False,
        use_mean_pooling=False,
        init_values=None,
    ),  # no table tells the heads: the config does
}


def official_state_dict(variant, seed=0):
    """A random ``SimMIM(VisionTransformerForSimMIM(...), encoder_stride=P).state_dict()``: the keys of
    ``reference_simmim.official_simmim_keys`` with the shapes ``models/vision_transformer.py`` gives them,
    persistent indexes as ``RelativePositionBias`` builds them; tables, gammas and the mask token random."""
    g = torch.Generator().manual_seed(seed)
    num_rel = (2 * GRID - 1) ** 2 + 3
    shapes = {
        "cls_token": (1, 1, D),
        "mask_token": (1, 1, D),
        "pos_embed": (1, GRID * GRID + 1, D),
        "patch_embed.proj.weight": (D, 3, P, P),
        "relative_position_bias_table": (num_rel, HEADS),
        "qkv.weight": (3 * D, D),
        "proj.weight": (D, D),
        "fc1.weight": (4 * D, D),
        "fc1.bias": (4 * D,),
        "fc2.weight": (D, 4 * D),
        "decoder.0.weight": (P * P * 3, D, 1, 1),
        "decoder.0.bias": (P * P * 3,),
    }
    sd = OrderedDict()
    for key in ref.official_simmim_keys(DEPTH, **VARIANTS[variant]):
        if key.endswith("relative_position_index"):
            sd[key] = ref.official_relative_position_index((GRID, GRID))
            continue
        shape = next((s for k, s in shapes.items() if key == k or key.endswith("." + k)), (D,))
        value = torch.randn(*shape, generator=g) * 0.2
        sd[key] = 1 + value if key.endswith("norm.weight") or re.search(r"norm\d\.weight$", key) else value
    return sd


@pytest.fixture
def yacs(monkeypatch):
    """A stand-in ``yacs.config.CfgNode`` that pickles as yacs' does (a dict subclass whose ``__dict__`` holds
    ``__immutable__``, ``__deprecated_keys__`` (a set), ``__renamed_keys__``, ``__new_allowed__``), so the
    fixture file is what ``torch.save`` writes for SimMIM's config without yacs installed (byte-identical
    pickles to yacs 0.1.8's for :func:`official_config`; :func:`test_a_real_yacs_config_reads_the_same` runs
    the real one where yacs is installed)."""
    config = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, new_allowed=False):
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init_dict or {}).items()})
            self.__dict__.update(
                {
                    "__immutable__": False,
                    "__deprecated_keys__": set(),
                    "__renamed_keys__": {},
                    "__new_allowed__": new_allowed,
                }
            )

        def freeze(self):
            self.__dict__["__immutable__"] = True
            for v in self.values():
                if isinstance(v, CfgNode):
                    v.freeze()
            return self

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return CfgNode


def official_config(variant, **vit):
    """The parts of SimMIM's ``config.py`` the importer reads, plus enough of the rest to look like it."""
    v = VARIANTS[variant]
    return {
        "DATA": {
            "BATCH_SIZE": 128,
            "DATA_PATH": "/imagenet/train",
            "DATASET": "imagenet",
            "IMG_SIZE": IMG,
            "INTERPOLATION": "bicubic",
            "PIN_MEMORY": True,
            "NUM_WORKERS": 8,
            "MASK_PATCH_SIZE": MASK_PATCH,
            "MASK_RATIO": 0.6,
        },
        "MODEL": {
            "TYPE": "vit",
            "NAME": "simmim_pretrain",
            "RESUME": "",
            "NUM_CLASSES": 1000,
            "DROP_RATE": 0.0,
            "DROP_PATH_RATE": 0.1,
            "LABEL_SMOOTHING": 0.1,
            "VIT": {
                "PATCH_SIZE": P,
                "IN_CHANS": 3,
                "EMBED_DIM": D,
                "DEPTH": DEPTH,
                "NUM_HEADS": HEADS,
                "MLP_RATIO": 4,
                "QKV_BIAS": True,
                "INIT_VALUES": v["init_values"],
                "USE_APE": v["use_abs_pos_emb"],
                "USE_RPB": v["use_rel_pos_bias"],
                "USE_SHARED_RPB": v["use_shared_rel_pos_bias"],
                "USE_MEAN_POOLING": v["use_mean_pooling"],
                **vit,
            },
        },
        "TRAIN": {
            "START_EPOCH": 0,
            "EPOCHS": 800,
            "WARMUP_EPOCHS": 10,
            "WEIGHT_DECAY": 0.05,
            "BASE_LR": 4e-4,
            "WARMUP_LR": 2e-6,
            "MIN_LR": 2e-5,
            "CLIP_GRAD": 5.0,
            "AUTO_RESUME": True,
            "LR_SCHEDULER": {"NAME": "multistep", "MULTISTEPS": [700], "GAMMA": 0.1},
            "OPTIMIZER": {"NAME": "adamw", "EPS": 1e-8, "BETAS": (0.9, 0.999), "MOMENTUM": 0.9},
        },
        "AMP_OPT_LEVEL": "O1",
        "OUTPUT": "output/simmim_pretrain/run",
        "TAG": "run",
        "SAVE_FREQ": 5,
        "PRINT_FREQ": 100,
        "SEED": 0,
        "EVAL_MODE": False,
        "THROUGHPUT_MODE": False,
        "LOCAL_RANK": 0,
        "PRETRAINED": "",
    }


def save_checkpoint(tmp_path, sd, config=None, name="ckpt_epoch_99.pth"):
    """What ``utils.save_checkpoint`` writes (``AMP_OPT_LEVEL != 'O0'`` adds apex's ``amp.state_dict()``)."""
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    w.sum().backward(), opt.step()
    state = {"model": sd}
    if config is not None:
        state.update(
            optimizer=opt.state_dict(),
            # MultiStepLRScheduler.state_dict(): timm Scheduler's __dict__ but the optimizer
            lr_scheduler={
                "param_group_field": "lr",
                "_initial_param_group_field": "initial_lr",
                "base_values": [4e-4],
                "metric": None,
                "t_in_epochs": False,
                "noise_range_t": None,
                "noise_pct": 0.67,
                "noise_type": "normal",
                "noise_std": 1.0,
                "noise_seed": 42,
                "initialize": True,
                "milestones": [70000],
                "gamma": 0.1,
                "warmup_t": 1000,
                "warmup_lr_init": 2e-6,
                "warmup_steps": [3.98e-07],
            },
            max_accuracy=0.0,
            epoch=99,
            config=config,
            amp=OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 120}),
        )
    path = tmp_path / name
    torch.save(state, path)
    return path


def images(b=4, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def official_masks(b=4, seed=0):
    """SimMIM's MaskGenerator (8 px mask patches over 4 px patches, 60 %) as the loader gives it, ``[B, 8, 8]``."""
    rs = np.random.RandomState(seed)
    return torch.from_numpy(np.stack([ref.official_mask_generator(IMG, MASK_PATCH, P, 0.6, rs) for _ in range(b)]))


def check_against_official(model, sd, label):
    x, mask = images(), official_masks()
    loss, rec = ref.official_simmim_loss(sd, x, mask, num_heads=HEADS, return_rec=True)
    with torch.no_grad():
        out = model(x, mask=mask.flatten(1).bool())
    print(
        f"{label}: |loss - official| = {(out.loss - loss).abs().item():.2e}, "
        f"max |reconstruction - official| = {(out.pred - rec).abs().max().item():.2e}"
    )
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.pred, rec, rtol=1e-5, atol=1e-5)
    other = ref.official_simmim_loss(sd, x, official_masks(seed=5), num_heads=HEADS)
    assert (other - loss).abs() > 1e-3  # the mask matters


# --- (a) the official loss and reconstruction --------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_checkpoint_gives_the_official_loss(tmp_path, yacs, variant):
    sd = official_state_dict(variant)
    path = save_checkpoint(tmp_path, sd, yacs(official_config(variant)).freeze())
    config = read_official(path)["config"]  # read without yacs' code, as nested dicts
    assert config["MODEL"]["VIT"]["NUM_HEADS"] == HEADS and config.__dict__["__immutable__"] is True
    model = load_official("simmim", path)
    h = model.hparams
    assert h.encoder["num_heads"] == HEADS and h.encoder["img_size"] == IMG
    assert h.mask == {"name": "random", "ratio": 0.6, "cell": MASK_PATCH // P}  # from config.DATA
    assert h.use_abs_pos_emb == VARIANTS[variant]["use_abs_pos_emb"]
    assert h.encoder.get("global_pool", "token") == ("avg" if VARIANTS[variant]["use_mean_pooling"] else "token")
    assert h.layer_scale_init == VARIANTS[variant]["init_values"]
    check_against_official(model, sd, variant)


def test_released_model_entry_alone_imports(tmp_path):
    """A file with only ``{'model': ...}`` (no config): sizes and heads from the weights, SimMIM's default mask."""
    sd = official_state_dict("vit_base_recipe", seed=4)
    model = load_official("simmim", save_checkpoint(tmp_path, sd))
    assert model.hparams.mask is None and model.mask_strategy.cell == 2
    check_against_official(model, sd, "model entry only")


def test_cli_import_then_load_pretrained_and_export(tmp_path, yacs, capsys):
    sd = official_state_dict("vit_base_recipe", seed=2)
    src, out = save_checkpoint(tmp_path, sd, yacs(official_config("vit_base_recipe")).freeze()), tmp_path / "s.ckpt"
    import_main(["simmim", str(src), str(out)])
    assert "wrote" in capsys.readouterr().out
    assert torch.load(out, weights_only=False)["mimzoo"]["method"] == "mimzoo.methods.simmim.SimMIM"
    model = load_pretrained(out).eval()
    check_against_official(model, sd, "mimzoo-import -> load_pretrained")
    kwargs, state = model.export_timm()
    vit = timm.create_model(**kwargs).eval()
    vit.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vit(images()), model.features(images()), rtol=1e-6, atol=1e-6)


def test_a_real_yacs_config_reads_the_same(tmp_path):
    """With yacs installed, its own CfgNode (what SimMIM pickles) reads through the stand-in too."""
    cfg_node = pytest.importorskip("yacs.config").CfgNode
    sd = official_state_dict("vit_base_recipe")
    config = cfg_node(official_config("vit_base_recipe"))
    config.freeze()
    path = save_checkpoint(tmp_path, sd, config)
    assert read_official(path)["config"]["DATA"]["MASK_PATCH_SIZE"] == MASK_PATCH
    check_against_official(load_official("simmim", path), sd, "real yacs")


# --- (b) wrong files: one line naming the fix --------------------------------------------------------
def test_wrong_files_name_the_importer(tmp_path):
    import reference_beit

    beit = reference_beit.official_state_dict(
        img_size=IMG, patch_size=P, embed_dim=D, depth=1, num_heads=HEADS, vocab_size=16
    )
    backbone = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=P,
        embed_dim=D,
        depth=1,
        num_heads=HEADS,
        num_classes=10,
    ).state_dict()
    swin = {
        "encoder.patch_embed.proj.weight": torch.zeros(D, 3, 4, 4),
        "encoder.layers.0.blocks.0.norm1.weight": torch.zeros(D),
        "decoder.0.weight": torch.zeros(32 * 32 * 3, 8 * D, 1, 1),
    }
    stride16 = dict(
        official_state_dict("vit_base_recipe"),
        **{"decoder.0.weight": torch.zeros(16 * 16 * 3, D, 1, 1), "decoder.0.bias": torch.zeros(16 * 16 * 3)},
    )
    cases = {
        "beit": ({"model": beit}, r"is a BEiT pre-training checkpoint \(lm_head\): use `mimzoo-import beit "),
        "backbone": (backbone, r"is a ViT backbone without SimMIM's encoder./decoder. keys .*`mimzoo-import beit "),
        "swin": ({"model": swin}, r"is a SimMIM Swin checkpoint \(encoder.layers.\*\); only SimMIM's ViT"),
        "stride16": (
            {"model": stride16},
            r"decoder.0.weight predicts 768 values per token, not patch 4\^2 x 3 "
            r"channels; mimzoo's SimMIM needs encoder_stride = patch size",
        ),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        with pytest.raises(SystemExit) as err:
            import_main(["simmim", str(tmp_path / f"{name}.pth"), str(tmp_path / "out.ckpt")])
        text = str(err.value)
        assert "\n" not in text and re.search(message, text), (name, text)
    assert not (tmp_path / "out.ckpt").exists()
    simmim = official_state_dict("vit_base_recipe")  # and the other way round: beit names simmim
    torch.save({"model": simmim}, tmp_path / "simmim.pth")
    with pytest.raises(
        SystemExit,
        match=r"is a SimMIM checkpoint \(encoder.\*, decoder.0.\*\): "
        r"use `mimzoo-import simmim",
    ):
        import_main(["beit", str(tmp_path / "simmim.pth"), str(tmp_path / "out.ckpt")])
    assert isinstance(load_official("simmim", tmp_path / "simmim.pth"), SimMIM)
