"""Hugging Face transformers in and out, checked against transformers itself (random tiny models built
from configs, nothing downloaded): a ``ViTMAEForPreTraining`` directory imports into our MAE with the same
loss on the same mask (HF's ``noise``), ours exports to one that ``from_pretrained`` loads with the same loss,
ViT backbones export to ``ViTModel`` with our ``[CLS]`` features, and the exported image processor is our
evaluation transform. Also: exports carry the training preprocessing (timm ``pretrained_cfg``) and timm's
architecture name."""

import json

import numpy as np
import pytest
import timm
import torch

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoImageProcessor, ViTMAEConfig, ViTMAEForPreTraining, ViTModel  # noqa: E402

from conftest import TINY, TINY_MAE  # noqa: E402
from mimzoo.checkpoints import export_main, import_main, load_official, load_pretrained, timm_model_name  # noqa: E402
from mimzoo.checkpoints.hf import hf_noise  # noqa: E402
from mimzoo.data import build_transform  # noqa: E402
from mimzoo.methods import MAE, ConvMAE, iBOT  # noqa: E402
from mimzoo.nn import sincos_pos_embed_2d  # noqa: E402

L = 64  # 32 px images, 4 px patches
TINY_HF = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=32,
    patch_size=4,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    layer_norm_eps=1e-6,
)


def randomize(module, seed=0):
    """Every parameter random (norms and position tables included), so a swapped or dropped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def hf_mae(seed=0, **config):
    torch.manual_seed(seed)
    return randomize(ViTMAEForPreTraining(ViTMAEConfig(**{**TINY_HF, **config})), seed)


def images(b=3, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_mask(b=3, keep=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, L, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(L, generator=g)[:keep]] = False
    return mask


def hf_loss(model, x, mask):
    with torch.no_grad():
        out = model(pixel_values=x, noise=hf_noise(mask, model.config.mask_ratio))
    assert torch.equal(out.mask.bool(), mask)  # HF masked exactly our patches
    return out.loss


def our_loss(model, x, mask):
    with torch.no_grad():
        return model(x, mask=mask).loss


def save_ckpt(model, path, data=None):
    """A mimzoo checkpoint as a training run writes it (``data``: the data module's hyper-parameters)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    if data is not None:
        ckpt["datamodule_hyper_parameters"] = data
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


# --- HF -> mimzoo ---------------------------------------------------------------------------------
def _v4_names(hf_dir):
    """The directory's weights under transformers 4.x's names (the hub's files): 5.x writes the decoder layers
    as decoder.decoder_encoder.layer.<i>, 4.x as decoder.decoder_layers.<i>."""
    sd = load_file(str(hf_dir / "model.safetensors"))
    return {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in sd.items()}


@pytest.mark.parametrize("files", ["save_pretrained", "v4_safetensors", "v4_bin", "v5_module_names"])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_directory_imports_with_the_same_loss(tmp_path, files, norm_pix_loss):
    """save_pretrained -> mimzoo-import hf -> our loss == ViTMAEForPreTraining's loss on the same images and
    mask, for the files 5.x writes, the 4.x (hub) names as safetensors or .bin, and 5.x's module names."""
    hf = hf_mae(norm_pix_loss=norm_pix_loss)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if files != "save_pretrained":
        sd = hf.state_dict() if files == "v5_module_names" else _v4_names(src)
        (src / "model.safetensors").unlink()
        if files == "v4_bin":
            torch.save(sd, src / "pytorch_model.bin")
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
    out = tmp_path / "mae.ckpt"
    import_main(["hf", str(src), str(out)])
    ours = load_pretrained(out).eval()
    assert ours.norm_pix_loss is norm_pix_loss and ours.mask_strategy.ratio == 0.75
    assert ours.hparams.encoder["num_heads"] == 2 and ours.hparams.decoder["mlp_ratio"] == 2.0
    x, mask = images(), random_mask()
    expected = hf_loss(hf, x, mask)
    assert abs(our_loss(ours, x, mask) - expected) <= 1e-6 * abs(expected)
    with torch.no_grad():  # the encoder too: HF's final-norm tokens are ours (visible ones in grid order)
        latent = hf.vit(pixel_values=x, noise=hf_noise(mask)).last_hidden_state
        torch.testing.assert_close(ours.encode(x, mask), latent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_official("hf", src).features(x), ours.features(x))


def test_encoder_only_directory_imports_with_a_fresh_decoder(tmp_path):
    hf = hf_mae()
    hf.vit.save_pretrained(tmp_path / "vit")  # a ViTMAEModel
    with pytest.warns(UserWarning, match="no decoder weights"):
        ours = load_official("hf", tmp_path / "vit")
    x, mask = images(), random_mask()
    with torch.no_grad():
        latent = hf.vit(pixel_values=x, noise=hf_noise(mask)).last_hidden_state
        torch.testing.assert_close(ours.encode(x, mask), latent, rtol=1e-5, atol=1e-5)


def test_hf_sincos_tables_are_ours():
    """HF builds MAE's fixed sin-cos tables (its own halves rotated "to match the pretrained layout"): ours."""
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEEmbeddings

    config = ViTMAEConfig(**TINY_HF)
    embeddings = ViTMAEEmbeddings(config)
    embeddings.initialize_weights()
    decoder = ViTMAEDecoder(config, num_patches=L)
    for table in (embeddings.position_embeddings, decoder.decoder_pos_embed):
        assert table.abs().sum() > 0
        torch.testing.assert_close(table.detach(), sincos_pos_embed_2d(32, (8, 8), cls_token=True), rtol=0, atol=1e-6)


def test_layer_norm_eps_is_refused_unless_overridden(tmp_path):
    """facebook/vit-mae-* configs say 1e-12: refused, named, and imported with the override (loss within 1e-5)."""
    hf = hf_mae(layer_norm_eps=1e-12)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"layer_norm_eps=1e-12(.|\n)*layer_norm_eps=1e-06"):
        load_official("hf", tmp_path / "hf")
    with pytest.raises(SystemExit, match="layer_norm_eps=1e-12"):
        import_main(["hf", str(tmp_path / "hf"), str(tmp_path / "out.ckpt")])
    import_main(["hf", str(tmp_path / "hf"), str(tmp_path / "out.ckpt"), "layer_norm_eps=1e-6"])
    ours = load_pretrained(tmp_path / "out.ckpt").eval()
    x, mask = images(), random_mask()
    expected, got = hf_loss(hf, x, mask), our_loss(ours, x, mask)
    assert abs(got - expected) <= 1e-5 * abs(expected)  # measured: 8e-8 relative


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "gelu_new", "hidden_act='gelu_new'"),
        ("qkv_bias", False, "qkv_bias=false"),
        ("image_size", [32, 48], r"image_size=\[32, 48\]"),
        ("model_type", "vit", "model_type 'vit'"),
    ],
)
def test_configs_we_cannot_represent_are_refused(tmp_path, field, value, message):
    hf_mae().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
        load_official("hf", tmp_path / "hf")


def test_wrong_files_are_named_in_hf_terms(tmp_path):
    hf_mae().save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del sd["decoder.decoder_pred.weight"]
    sd["classifier.weight"] = torch.zeros(10, 32)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"unexpected keys \(1\): classifier.weight(.|\n)*"
        r"missing keys \(1\): decoder.decoder_pred.weight",
    ):
        load_official("hf", tmp_path / "hf")
    with pytest.raises(ValueError, match="save_pretrained directory"):
        load_official("hf", tmp_path / "hf" / "config.json")


# --- mimzoo -> HF ---------------------------------------------------------------------------------
def tiny_mae(ratio=0.75, norm_pix_loss=True):
    torch.manual_seed(0)
    return randomize(MAE(**TINY_MAE, mask={"name": "random", "ratio": ratio}, norm_pix_loss=norm_pix_loss))


@pytest.mark.parametrize("ratio, norm_pix_loss", [(0.75, True), (0.6, False)])
def test_export_loads_in_transformers_with_the_same_loss(tmp_path, ratio, norm_pix_loss):
    """mimzoo-export --format hf -> ViTMAEForPreTraining.from_pretrained: every weight used, the same loss on
    the same mask, and HF's own random masking keeps as many patches as ours (0.6: 26 of 64, where HF's
    int(64 * 0.4) would keep 25)."""
    model = tiny_mae(ratio, norm_pix_loss)
    export_main([str(save_ckpt(model, tmp_path / "mae.ckpt")), str(tmp_path / "hf"), "--format", "hf"])
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hf.eval()
    assert hf.config.norm_pix_loss is norm_pix_loss
    keep = L - model.draw_mask(1).sum().item()
    x, mask = images(), random_mask(keep=keep)
    expected = our_loss(model, x, mask)
    assert abs(hf_loss(hf, x, mask) - expected) <= 1e-6 * abs(expected)
    with torch.no_grad():
        assert hf(pixel_values=x).mask.sum(1).tolist() == [L - keep] * 3


def test_vit_backbones_export_to_vit_model(tmp_path):
    """MAE with --format hf-vit, iBOT (its teacher) with --format hf: ViTModel's last_hidden_state[:, 0] is
    our features; a ConvMAE is refused."""
    torch.manual_seed(0)
    ibot = iBOT(
        encoder=TINY_MAE["encoder"],
        head=dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
        mask=dict(name="ibot", ratio=0.3, ratio_var=0.2),
    )
    for name, model, fmt in (("mae", tiny_mae(), "hf-vit"), ("ibot", randomize(ibot), "hf")):
        export_main([str(save_ckpt(model, tmp_path / f"{name}.ckpt")), str(tmp_path / name), "--format", fmt])
        vit, info = ViTModel.from_pretrained(tmp_path / name, add_pooling_layer=False, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(vit.eval()(x).last_hidden_state[:, 0], model.features(x), rtol=1e-5, atol=1e-5)
    convmae = ConvMAE(
        encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 16, 32], depth=[1, 1, 2], num_heads=2),
        decoder=dict(dim=32, depth=1, num_heads=2),
    )
    with pytest.raises(SystemExit, match="not a ViT(.|\n)*--format timm"):
        export_main([str(save_ckpt(convmae, tmp_path / "convmae.ckpt")), str(tmp_path / "c"), "--format", "hf"])


def _smooth_image(h, w):
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy), xx * yy], -1) * 0.5 + 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_exported_image_processor_is_our_eval_transform(tmp_path):
    """AutoImageProcessor.from_pretrained(export): resize the shorter side to size / crop_pct, centre crop,
    normalise with the training mean/std, as build_transform("eval")."""
    data = dict(name="imagefolder", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], crop_pct=0.8)
    export_main([str(save_ckpt(tiny_mae(), tmp_path / "mae.ckpt", data)), str(tmp_path / "hf"), "--format", "hf"])
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    ours = build_transform("eval", 32, data["mean"], data["std"], crop_pct=data["crop_pct"])
    image = _smooth_image(48, 60)
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, ours(image), rtol=0, atol=0.05)  # resampling kernels differ a little


# --- timm exports: the training preprocessing and timm's name ---------------------------------------
@pytest.mark.slow
def test_cli_export_carries_the_training_preprocessing(tmp_path, cli):
    """A tiny CLI pre-training run with its own mean/std -> mimzoo-export -> timm.create_model(**json):
    resolve_data_config gives 32 px and the run's mean/std back (not timm's 224 px, 0.5), and
    --format hf writes the same into the image processor."""
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]
    run_dir = tmp_path / "run"
    cli(
        "train",
        *TINY,
        "trainer.max_steps=2",
        "logger=csv",
        "probe.knn.enabled=false",
        "recon.enabled=false",
        f"+data.mean={mean}",
        f"+data.std={std}",
        f"hydra.run.dir={run_dir}",
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "vit.pth")])
    kwargs = json.loads((tmp_path / "vit.pth.json").read_text())
    vit = timm.create_model(**kwargs)
    vit.load_state_dict(torch.load(tmp_path / "vit.pth"), strict=True)
    cfg = timm.data.resolve_data_config({}, model=vit)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    np.testing.assert_allclose(cfg["mean"], mean) and np.testing.assert_allclose(cfg["std"], std)
    assert "cifar10-mini" in vit.pretrained_cfg["notes"] and "hf_hub_id" not in vit.pretrained_cfg
    assert kwargs["model_name"] == "vit_base_patch16_224"  # no timm model of this size: the generic class
    model = load_pretrained(ckpt).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), model.features(x))

    export_main([str(ckpt), str(tmp_path / "hf"), "--format", "hf"])
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = _smooth_image(32, 32)
    torch.testing.assert_close(
        processor(image, return_tensors="pt")["pixel_values"][0],
        build_transform("eval", 32, mean, std, crop_pct=1.0)(image),
        rtol=0,
        atol=1e-6,
    )


def test_imported_checkpoint_exports_with_timms_name_and_the_paper_preprocessing(tmp_path):
    """An imported ViT-S/16 (no data settings in the checkpoint) exports as vit_small_patch16_224 with
    ImageNet mean/std, 224 px, crop 0.875, and says where they come from."""
    torch.manual_seed(0)
    model = MAE(
        encoder=dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
        decoder=dict(dim=32, depth=1, num_heads=2),
    )
    ckpt = save_ckpt(model, tmp_path / "vit_s.ckpt")
    raw = torch.load(ckpt, weights_only=False)
    raw["mimzoo"]["imported_from"] = "mae_pretrain_vit_small.pth"
    torch.save(raw, ckpt)
    export_main([str(ckpt), str(tmp_path / "vit_s.pth")])
    kwargs = json.loads((tmp_path / "vit_s.pth.json").read_text())
    assert kwargs["model_name"] == "vit_small_patch16_224"
    vit = timm.create_model(**kwargs)
    cfg = timm.data.resolve_data_config({}, model=vit)
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.875
    np.testing.assert_allclose(cfg["mean"], (0.485, 0.456, 0.406)) and np.testing.assert_allclose(
        cfg["std"], (0.229, 0.224, 0.225)
    )
    assert (
        "paper default" in vit.pretrained_cfg["notes"] and "mae_pretrain_vit_small.pth" in vit.pretrained_cfg["notes"]
    )


@pytest.mark.parametrize(
    "family, sizes, name",
    [
        ("vit", dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224), "vit_small_patch16_224"),
        ("vit", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224), "vit_base_patch16_224"),
        ("vit", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=384), "vit_base_patch16_384"),
        ("vit", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, img_size=224), "vit_large_patch16_224"),
        ("vit", dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14, img_size=224), "vit_huge_patch14_224"),
        ("beit", dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224), "beit_base_patch16_224"),
        ("beit", dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, img_size=224), "beit_large_patch16_224"),
        ("vit", dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=96), "vit_base_patch16_224"),
        ("vit", dict(embed_dim=384, depth=6, num_heads=6, patch_size=16, img_size=224), "vit_base_patch16_224"),
        (
            "vit",
            dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224, mlp_ratio=2.0),
            "vit_base_patch16_224",
        ),
    ],
)
def test_timm_model_name(family, sizes, name):
    assert timm_model_name({"model_name": f"{family}_base_patch16_224", "mlp_ratio": 4.0, **sizes}) == name
    convvit = {"embed_dim": [256, 384, 768], "depth": [2, 2, 11], "num_heads": 12, "patch_size": [4, 2, 2]}
    assert timm_model_name({"model_name": "convmae_convvit", "img_size": 224, **convvit}) == "convmae_convvit"


def test_convmae_timm_export_carries_the_training_preprocessing(tmp_path):
    """convmae_convvit applies the export's pretrained_cfg_overlay like timm's own models do."""
    torch.manual_seed(0)
    model = ConvMAE(
        encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 16, 32], depth=[1, 1, 2], num_heads=2),
        decoder=dict(dim=32, depth=1, num_heads=2),
    )
    data = dict(image_size=32, crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    export_main([str(save_ckpt(model, tmp_path / "convmae.ckpt", data=data)), str(tmp_path / "convvit.pth")])
    vit = timm.create_model(**json.loads((tmp_path / "convvit.pth.json").read_text()))
    cfg = timm.data.resolve_data_config({}, model=vit)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 1.0
    np.testing.assert_allclose(cfg["mean"], data["mean"])
    np.testing.assert_allclose(cfg["std"], data["std"])
