"""ConvMAE: no leakage through the convolutions (and leakage without masked convolution), mask
upsampling order, visible-only stage 3, FLOPs masked vs unmasked, equality with an independent
official forward (tests/reference_convmae.py) and the importer, export to timm and fine-tuning, and
the Hydra entry points end to end on cifar10-mini."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import mimzoo
import reference_convmae as ref
from conftest import TINY
from mimzoo import masking
from mimzoo.checkpoints import import_main, load_pretrained
from mimzoo.eval.finetune import FineTune
from mimzoo.masking import mask_pyramid, upsample_mask
from mimzoo.methods import ConvMAE

ENC = dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 16, 32], depth=[1, 1, 2], num_heads=2)
DEC = dict(dim=32, depth=1, num_heads=2)
GRID, L, STRIDE = 8, 64, 4
# conftest's TINY with the ConvMAE encoder size group instead of the ViT one
TINY_CONVMAE = [o for o in TINY if not o.startswith("model/encoder=")] + ["model=convmae", "model/convmae_encoder=test"]


def tiny(**kw) -> ConvMAE:
    torch.manual_seed(0)
    return ConvMAE(encoder=ENC, decoder=DEC, **kw).eval()


def images(b=4, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed_mask(b=4, seed=0, ratio=0.75):
    return masking.build("random", ratio=ratio)(b, (GRID, GRID), generator=torch.Generator().manual_seed(seed))


# --- masks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2, 4])
def test_upsampled_mask_lines_up_with_the_stage3_mask(scale):
    mask = fixed_mask()
    fine = upsample_mask(mask, (GRID, GRID), scale).view(4, GRID * scale, GRID * scale)
    coarse = mask.view(4, GRID, GRID)
    for r in range(GRID * scale):  # every fine cell (row-major) belongs to coarse patch (r // s, c // s)
        for c in range(GRID * scale):
            assert torch.equal(fine[:, r, c], coarse[:, r // scale, c // scale])
    assert torch.equal(fine, ref.upsample(mask, GRID, scale).squeeze(1).bool())  # the official permute route
    assert torch.equal(mask_pyramid(mask, (GRID, GRID), [scale])[0], fine)
    assert fine.float().mean() == mask.float().mean()


def test_multiscale_strategy_wraps_a_base_and_keeps_the_ratio():
    gen = torch.Generator().manual_seed(0)
    multi = masking.build("multiscale", ratio=0.6, base={"name": "block"})
    assert "multiscale" in masking.available() and multi.ratio == 0.6
    assert type(multi.base).__name__ == "BlockMask"
    m = multi(8, (GRID, GRID), generator=gen)
    assert m.dtype == torch.bool and (m.sum(1) == masking.num_masked(0.6, L)).all()
    same = masking.build("random", ratio=0.75)(3, (14, 14), generator=torch.Generator().manual_seed(1))
    assert torch.equal(masking.build("multiscale")(3, (14, 14), generator=torch.Generator().manual_seed(1)), same)
    with pytest.raises(ValueError, match="contradicts"):
        masking.build("multiscale", ratio=0.5, base={"name": "random", "ratio": 0.75})


# --- no leakage ----------------------------------------------------------------------------------
def perturb_masked_pixels(x, mask):
    pix = upsample_mask(mask, (GRID, GRID), STRIDE).view(-1, 1, 32, 32)
    return torch.where(pix, torch.randn_like(x) * 5, x)


def encoder_views(model, x, mask):
    """Stage-1 and stage-2 maps at visible positions, stage-3 block outputs and the fused latent."""
    captured = {}
    hook = model.encoder.blocks3.register_forward_hook(lambda m, i, o: captured.update(stage3=o))
    with torch.no_grad():
        latent = model.encode(x, mask)
        s1, s2, _ = model.encoder.forward_stages(x, model.encoder.visible_maps(mask))
    hook.remove()
    v1, v2 = (~m for m in mask_pyramid(mask, (GRID, GRID), model.encoder.stage_scales))
    return dict(
        stage1=s1.permute(0, 2, 3, 1)[v1], stage2=s2.permute(0, 2, 3, 1)[v2], stage3=captured["stage3"], latent=latent
    )


def test_masked_pixels_reach_no_visible_feature_at_any_stage():
    model, x, mask = tiny(), images(), fixed_mask()
    a, b = encoder_views(model, x, mask), encoder_views(model, perturb_masked_pixels(x, mask), mask)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # the decoder's predictions depend only on what the encoder saw
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, mask).pred, model(perturb_masked_pixels(x, mask), mask).pred, rtol=0, atol=1e-6
        )


def test_without_masked_convolution_masked_pixels_leak():
    model, x, mask = tiny(), images(), fixed_mask()
    model.encoder.masked_conv = False  # the depth-wise convs now mix masked positions into visible ones
    a, b = encoder_views(model, x, mask), encoder_views(model, perturb_masked_pixels(x, mask), mask)
    for name in a:
        assert (a[name] - b[name]).abs().max() > 1e-3, name


def test_loss_falls_on_a_fixed_batch_and_every_stage_gets_gradients():
    model, x, mask = tiny().train(), images(), fixed_mask()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(x, mask).loss
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = loss.item()
            for name in (
                "patch_embed1.proj",
                "blocks1.0.attn",
                "blocks2.0.attn",
                "stage1_output_decode",
                "stage2_output_decode",
                "blocks3.1.attn.qkv",
            ):
                assert model.encoder.get_submodule(name).weight.grad.abs().sum() > 0, name
            assert model.encoder.pos_embed.grad is None  # fixed sin-cos positions
        opt.step()
    assert loss.item() < 0.7 * first


# --- visible-only stage 3 and cost ---------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_only_visible_tokens_enter_stage3(ratio):
    model, seen = tiny(), []
    model.encoder.blocks3[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        out = model(images(), fixed_mask(ratio=ratio))
    assert seen == [(4, L - masking.num_masked(ratio, L), 32)]
    assert out.pred.shape == (4, L, STRIDE * STRIDE * 3)  # the decoder still predicts every patch


def path_flops(model, x, mask) -> dict:
    """FLOPs of one forward: stage 3's blocks, the decoder, and everything."""
    with FlopCounterMode(display=False) as counter:
        model(x, mask)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return dict(
        stage3=counts["ConvMAE.encoder.blocks3"], decoder=counts["ConvMAE.decoder"], total=counter.get_total_flops()
    )


def test_masking_makes_stage3_and_decoder_clearly_cheaper():
    torch.manual_seed(0)  # ConvMAE-CIFAR with the convmae_cifar decoder (256 x 4)
    model = ConvMAE(
        encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[64, 128, 256], depth=[2, 2, 8], num_heads=4),
        decoder=dict(dim=256, depth=4, num_heads=8),
    ).eval()
    x = images(b=2)
    with torch.no_grad():
        masked = path_flops(model, x, fixed_mask(b=2))
        full = path_flops(model, x, torch.zeros(2, L, dtype=torch.bool))
    assert masked["stage3"] < 0.3 * full["stage3"]  # 16 of 64 tokens (attention grows even faster)
    assert masked["stage3"] + masked["decoder"] < 0.6 * (full["stage3"] + full["decoder"])
    assert masked["total"] < full["total"]


# --- official equivalence and import -------------------------------------------------------------
def official_state_dict(seed=0, dims=(8, 16, 32), depth=(1, 2, 2), patches=(1, 2, 2), dec=32, dec_depth=1):
    """Random official-format ConvMAE weights (positions random too, to prove they are used as given);
    conv-stage MLP ratio 2 and decoder MLP ratio 3, to prove they are inferred."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def ln(name, d):
        sd.update({f"{name}.weight": 1 + r(d), f"{name}.bias": r(d)})

    def conv(name, cout, cin, k):
        sd.update({f"{name}.weight": r(cout, cin, k, k, s=0.5), f"{name}.bias": r(cout)})

    def vit_block(name, d, hidden):
        ln(f"{name}.norm1", d)
        ln(f"{name}.norm2", d)
        sd.update(
            {
                f"{name}.attn.qkv.weight": r(3 * d, d),
                f"{name}.attn.qkv.bias": r(3 * d),
                f"{name}.attn.proj.weight": r(d, d),
                f"{name}.attn.proj.bias": r(d),
                f"{name}.mlp.fc1.weight": r(hidden, d),
                f"{name}.mlp.fc1.bias": r(hidden),
                f"{name}.mlp.fc2.weight": r(d, hidden),
                f"{name}.mlp.fc2.bias": r(d),
            }
        )

    sd, chans = {}, (3, *dims)
    for i in range(3):
        conv(f"patch_embed{i + 1}.proj", chans[i + 1], chans[i], patches[i])
        ln(f"patch_embed{i + 1}.norm", chans[i + 1])
    sd.update(
        {
            "patch_embed4.weight": r(dims[2], dims[2]),
            "patch_embed4.bias": r(dims[2]),
            "pos_embed": r(1, L, dims[2], s=0.5),
        }
    )
    conv("stage1_output_decode", dims[2], dims[0], patches[1] * patches[2])
    conv("stage2_output_decode", dims[2], dims[1], patches[2])
    for s in range(2):
        for i in range(depth[s]):
            name, d = f"blocks{s + 1}.{i}", dims[s]
            ln(f"{name}.norm1", d)
            ln(f"{name}.norm2", d)
            conv(f"{name}.conv1", d, d, 1)
            conv(f"{name}.conv2", d, d, 1)
            sd.update({f"{name}.attn.weight": r(d, 1, 5, 5, s=0.5), f"{name}.attn.bias": r(d)})
            conv(f"{name}.mlp.fc1", 2 * d, d, 1)
            conv(f"{name}.mlp.fc2", d, 2 * d, 1)
    for i in range(depth[2]):
        vit_block(f"blocks3.{i}", dims[2], 4 * dims[2])
    ln("norm", dims[2])
    sd.update(
        {
            "decoder_embed.weight": r(dec, dims[2]),
            "decoder_embed.bias": r(dec),
            "mask_token": r(1, 1, dec),
            "decoder_pos_embed": r(1, L, dec, s=0.5),
        }
    )
    for i in range(dec_depth):
        vit_block(f"decoder_blocks.{i}", dec, 3 * dec)
    ln("decoder_norm", dec)
    sd.update({"decoder_pred.weight": r(STRIDE**2 * 3, dec), "decoder_pred.bias": r(STRIDE**2 * 3)})
    return sd


HEADS = dict(encoder={"num_heads": 2}, decoder={"num_heads": 2})


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_and_pred_equal_official_reference(tmp_path, norm_pix_loss):
    sd = official_state_dict()
    path = tmp_path / "convmae.pth"
    torch.save({"model": sd}, path)
    model = mimzoo.load_official("convmae", path, **HEADS, norm_pix_loss=norm_pix_loss)
    assert model.hparams.encoder == dict(
        img_size=32,
        patch_size=[1, 2, 2],
        embed_dim=[8, 16, 32],
        depth=[1, 2, 2],
        num_heads=2,
        mlp_ratio=[2.0, 2.0, 4.0],
        in_chans=3,
    )
    assert model.hparams.decoder == dict(dim=32, depth=1, num_heads=2, mlp_ratio=3.0)
    x, noise = images(), torch.rand(4, L, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = ref.forward(sd, x, noise, 2, 2, norm_pix_loss)
    with torch.no_grad():
        out = model(x, mask=mask.bool())
        latent = model.encode(x, mask.bool())
    # the official latent lists visible tokens in shuffle order, ours in grid order
    grid_order = ref.random_masking(noise, 0.75)[0].argsort(1).unsqueeze(-1).expand(-1, -1, 32)
    torch.testing.assert_close(latent, ref.encoder(sd, x, 2, noise)[0].gather(1, grid_order), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pred, pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    model.encoder.masked_conv = False  # the flag removes exactly the mask multiply, nothing else
    with torch.no_grad():
        leaky = ref.encoder(sd, x, 2, noise, masked_conv=False)[0].gather(1, grid_order)
        torch.testing.assert_close(model.encode(x, mask.bool()), leaky, rtol=1e-4, atol=1e-5)


def test_cli_import_round_trips_and_wrong_files_fail(tmp_path):
    sd = official_state_dict(seed=3)
    src, out = tmp_path / "convmae.pth", tmp_path / "convmae.ckpt"
    torch.save({"model": sd}, src)
    import_main(["convmae", str(src), str(out), "encoder.num_heads=2", "decoder.num_heads=2"])
    model = load_pretrained(out)
    assert isinstance(model, ConvMAE)
    ours = model.state_dict()
    assert torch.equal(ours["encoder.stage1_output_decode.weight"], sd["stage1_output_decode.weight"])
    assert torch.equal(ours["decoder.mask_token"], sd["mask_token"])
    assert torch.equal(ours["encoder.blocks2.1.attn.weight"], sd["blocks2.1.attn.weight"])
    broken = {k: v for k, v in sd.items() if k != "stage2_output_decode.bias"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): stage2_output_decode.bias"):
        mimzoo.load_official("convmae", tmp_path / "broken.pth", **HEADS)
    torch.save({"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 65, 8)}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="not a ConvMAE checkpoint"):
        mimzoo.load_official("convmae", tmp_path / "mae.pth")


# --- export and fine-tuning ----------------------------------------------------------------------
def test_export_loads_strictly_into_timm_and_gives_the_same_features():
    model, x = tiny(), images()
    kwargs, state = model.export_timm()
    timm_model = timm.create_model(**kwargs)
    timm_model.load_state_dict(state, strict=True)
    timm_model.eval()
    with torch.no_grad():
        feats = model.features(x)
        torch.testing.assert_close(timm_model(x), feats, rtol=0, atol=1e-6)
        # = mean of the final-norm stage-3 tokens of the unmasked image
        _, _, tokens = model.encoder.forward_stages(x)
        torch.testing.assert_close(feats, model.encoder.norm(model.encoder.blocks3(tokens)).mean(1))
    assert feats.shape == (4, 32)


def test_finetune_from_pretrained_runs_a_step_with_layer_decay():
    module = FineTune.from_pretrained(tiny(), num_classes=10, mixup=0.0, cutmix=0.0)
    enc_state = tiny().export_timm()[1]
    assert torch.equal(module.model.state_dict()["blocks3.1.attn.qkv.weight"], enc_state["blocks3.1.attn.qkv.weight"])
    scales = {}
    for group in module.param_groups():
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    named = dict(module.model.named_parameters())
    decay = module.hparams.layer_decay
    assert scales[id(named["patch_embed1.proj.weight"])] == scales[id(named["blocks2.0.attn.weight"])] == decay**3
    assert scales[id(named["blocks3.0.attn.qkv.weight"])] == decay**2
    assert scales[id(named["head.weight"])] == 1.0
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    loss = torch.nn.functional.cross_entropy(module(images()), torch.arange(4))
    loss.backward()
    assert module.model.patch_embed1.proj.weight.grad.abs().sum() > 0
    opt.step()


def test_finetune_model_has_the_official_convvit_names():
    """ConvMAE's fine-tuning ConvViT (``models_convvit.py``, global pool) = the pre-training encoder's names
    minus the fusion convs and the final norm, plus ``fc_norm`` and ``head``."""
    official = {k for k in official_state_dict() if not k.startswith(("decoder_", "mask_token", "stage", "norm."))}
    model = timm.create_model(
        "convmae_convvit",
        img_size=32,
        patch_size=[1, 2, 2],
        embed_dim=[8, 16, 32],
        depth=[1, 2, 2],
        num_heads=2,
        mlp_ratio=[2, 2, 4],
        num_classes=10,
    )
    assert set(model.state_dict()) == official | {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert model(images()).shape == (4, 10)


@pytest.mark.parametrize(
    "size, stride, grid", [("test", 4, 8), ("cifar", 4, 8), ("small", 16, 14), ("base", 16, 14), ("large", 16, 14)]
)
def test_size_configs_compose(size, stride, grid):
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR

    image = 32 if stride == 4 else 224
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=convmae", f"model/convmae_encoder={size}", f"data.image_size={image}"])
    enc = cfg.model.encoder
    assert enc.img_size == image and enc.patch_size[0] * enc.patch_size[1] * enc.patch_size[2] == stride
    assert image // stride == grid and enc.embed_dim[2] % enc.num_heads == 0


def test_convmae_cifar_preset_composes_and_builds():
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR, build_model

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=convmae_cifar"])
    assert cfg.mask.name == "multiscale" and cfg.mask.base.name == "random" and cfg.mask.ratio == 0.75
    model = build_model(cfg)
    assert isinstance(model, ConvMAE) and model.grid_size == (8, 8) and model.patch_size == 4
    assert model.decoder.embed.out_features == 256 and len(model.decoder.blocks) == 4


# --- end to end through the Hydra entry points ---------------------------------------------------
@pytest.mark.slow
def test_train_then_knn_eval_on_cifar10_mini(tmp_path, cli):
    run = tmp_path / "run"
    cli(
        "train",
        *TINY_CONVMAE,
        "mask=multiscale",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["mimzoo"]["method"] == "mimzoo.methods.convmae.ConvMAE" and saved["global_step"] == 2
    assert saved["hyper_parameters"]["encoder"]["patch_size"] == [1, 2, 2]
    assert list((run / "reconstructions").glob("epoch_*.png"))
    assert "probe/knn_top1" in (run / "metrics.csv").read_text().splitlines()[0]
    proc = cli(
        "evaluate",
        "protocol=knn",
        f"ckpt={ckpt}",
        "data=cifar10_mini",
        "data.num_workers=0",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert "knn top-1" in proc.stdout and (tmp_path / "eval" / "results.json").exists()
