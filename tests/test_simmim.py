"""SimMIM: the official loss and reconstruction on the same weights and mask, official-format weights in,
mask-cell geometry, no leakage of masked pixels, training and the packaged config."""

import numpy as np
import pytest
import timm
import torch

import reference_simmim as ref
from mimzoo import masking
from mimzoo.methods import SimMIM

ENCODER = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
GRID = 8


def tiny(**kwargs) -> SimMIM:
    torch.manual_seed(0)
    return SimMIM(encoder=ENCODER, **kwargs)


def official_state_dict(model: SimMIM) -> dict:
    """Our weights under the official key names: the same names, plus the persistent index buffer official
    checkpoints carry (timm keeps it out of the state dict)."""
    with torch.no_grad():  # non-trivial tables, gammas and mask token, so a wrong mapping would show
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "gamma_1", "gamma_2", "mask_token")):
                p.normal_(0, 0.3)
    sd = dict(model.state_dict())
    sd["encoder.rel_pos_bias.relative_position_index"] = ref.official_relative_position_index((GRID, GRID))
    assert list(sd) == ref.official_simmim_keys(2) or set(sd) == set(ref.official_simmim_keys(2))
    return sd


def official_masks(batch: int, seed: int = 0) -> torch.Tensor:
    """SimMIM's MaskGenerator for 32 px images, 8 px mask patches over 4 px patches, ratio 0.6: ``[B, 8, 8]``."""
    rs = np.random.RandomState(seed)
    return torch.from_numpy(np.stack([ref.official_mask_generator(32, 8, 4, 0.6, rs) for _ in range(batch)]))


def test_loss_and_reconstruction_equal_the_official_forward():
    model = tiny().eval()
    sd = official_state_dict(model)
    images, mask = torch.randn(4, 3, 32, 32), official_masks(4)
    loss, x_rec = ref.official_simmim_loss(sd, images, mask, num_heads=2, return_rec=True)
    out = model(images, mask=mask.flatten(1).bool())
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.pred, x_rec, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.loss, ref.official_simmim_loss(sd, images, 1 - mask, num_heads=2))  # mask matters


def test_gradients_equal_the_official_ones():
    model = tiny().train()
    sd = official_state_dict(model)
    images, mask = torch.randn(2, 3, 32, 32), official_masks(2, seed=3)
    model(images, mask=mask.flatten(1).bool()).loss.backward()
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
    ref.official_simmim_loss(leaves, images, mask, num_heads=2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_official_weights_load_strictly_by_name():
    """An official checkpoint's ``model`` entry loads into SimMIM once the index buffer is dropped."""
    source = tiny()
    sd = official_state_dict(source)
    sd.pop("encoder.rel_pos_bias.relative_position_index")
    target = SimMIM(encoder=ENCODER)
    target.load_state_dict(sd, strict=True)
    images, mask = torch.randn(2, 3, 32, 32), official_masks(2)
    mask = mask.flatten(1).bool()
    assert torch.equal(target.eval()(images, mask).loss, source.eval()(images, mask).loss)


def test_mask_masks_whole_cells_with_the_exact_count():
    strategy = masking.build("random", ratio=0.6, cell=2)
    mask = strategy(16, (GRID, GRID), generator=torch.Generator().manual_seed(0)).view(16, 4, 2, 4, 2)
    assert bool((mask == mask[:, :, :1, :, :1]).all())  # constant over every 2x2 cell
    assert mask[:, :, 0, :, 0].sum((1, 2)).tolist() == [round(0.6 * 16)] * 16  # 10 of 16 cells
    assert tiny().mask_strategy.cell == 2 and tiny().mask_strategy.ratio == 0.6
    # the registry rounds where SimMIM's generator takes the ceiling: equal here, one cell apart at 224 px
    assert ref.official_mask_count(32, 8, 0.6) == 10 and ref.official_mask_count(224, 32, 0.6) == 30
    assert masking.num_masked(0.6, 49) == 29
    with pytest.raises(ValueError, match="cell=3 does not divide"):
        masking.build("random", ratio=0.6, cell=3)(2, (GRID, GRID))


def test_masked_pixels_never_reach_the_encoder():
    model = tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = model.draw_mask(2, torch.Generator().manual_seed(1))
    pixels = model.pixel_mask(mask).bool().expand_as(images)
    poisoned = images.masked_fill(pixels, float("nan"))
    with torch.no_grad():
        clean, dirty = model.encode(images, mask), model.encode(poisoned, mask)
    assert torch.isfinite(dirty).all() and torch.equal(clean, dirty)


def test_weight_decay_spares_only_what_simmim_spares():
    model = tiny()
    decayed = {
        n
        for g in model.param_groups(0.05)
        if g["weight_decay"] > 0
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    names = dict(model.named_parameters())
    for name, param in names.items():
        assert (name in decayed) == ref.official_decays(name, tuple(param.shape)), name
    assert "encoder.mask_token" in decayed and "encoder.rel_pos_bias.relative_position_bias_table" in decayed


def test_loss_falls_and_export_is_a_strict_timm_beit():
    model = tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.randn(8, 3, 1, 1).expand(8, 3, 32, 32)  # one colour per image: visible patches tell it
    mask = model.draw_mask(8, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(images, mask=mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    kwargs, state = model.export_timm()
    vit = timm.create_model(**kwargs).eval()
    vit.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(images), model.features(images), rtol=1e-5, atol=1e-5)


def test_packaged_config_composes_and_builds():
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR, build_model

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=simmim", "model/encoder=test", "data=cifar10_mini"])
        other = compose("train", overrides=["model=mae", "mask=simmim"])
    assert cfg.mask == {"name": "random", "ratio": 0.6, "cell": 2} and cfg.optim.betas == [0.9, 0.999]
    model = build_model(cfg)
    assert isinstance(model, SimMIM) and model.grid_size == (GRID, GRID) and model.mask_strategy.cell == 2
    assert model(torch.randn(2, 3, 32, 32)).loss.isfinite()
    assert other.mask.cell == 2 and build_model(other).mask_strategy.cell == 2  # a preset any model can use


@pytest.mark.slow
def test_train_then_evaluate_and_export_through_the_cli(tmp_path, cli):
    """``mimzoo-train model=simmim``, then kNN and the timm export, with no file beyond the method's own."""
    from conftest import TINY

    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("model.decoder")]  # SimMIM has no decoder sizes
    cli(
        "train",
        "model=simmim",
        *overrides,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["mimzoo"]["method"] == "mimzoo.methods.simmim.SimMIM" and saved["global_step"] == 2
    assert saved["hyper_parameters"]["mask"] == {"name": "random", "ratio": 0.6, "cell": 2}
    assert list((run / "reconstructions").glob("epoch_*.png"))
    cli(
        "evaluate",
        "protocol=knn",
        f"ckpt={ckpt}",
        "data=cifar10_mini",
        "data.num_workers=0",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert (tmp_path / "eval" / "results.json").exists()
    from mimzoo.checkpoints import export_encoder

    kwargs = export_encoder(ckpt, tmp_path / "vit.pth")  # the export CLI's own function
    vit = timm.create_model(**kwargs)
    vit.load_state_dict(torch.load(tmp_path / "vit.pth"), strict=True)
