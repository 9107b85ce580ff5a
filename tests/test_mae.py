"""MAE properties: no leakage, loss on masked patches only, norm-pix target, reconstruction,
optimiser groups, linear LR scaling, the per-step schedule and clear errors."""

import math

import lightning as L
import pytest
import torch

from conftest import TINY_MAE
from mimzoo.data import MIMDataModule
from mimzoo.methods import MAE
from mimzoo.nn import patchify


def images(seed=0, b=4):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed_mask(model, b=4, seed=0):
    return model.draw_mask(b, torch.Generator().manual_seed(seed))


def perturb_masked_pixels(x, mask, patch=4):
    """Replace every pixel of the masked patches with noise; visible patches stay as they are."""
    pix = mask.view(-1, 8, 8).repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
    return torch.where(pix, torch.randn_like(x) * 5, x)


def test_forward_contract(tiny_mae):
    x = images()
    out = tiny_mae(x)
    assert out.loss.ndim == 0 and out.mask.dtype == torch.bool and out.mask.shape == (4, 64)
    assert out.pred.shape == (4, 64, 4 * 4 * 3)
    assert (out.mask.sum(1) == 48).all()
    mask = fixed_mask(tiny_mae)
    assert torch.equal(tiny_mae(x, mask=mask).mask, mask)  # an explicit mask is used as given
    assert tiny_mae.encode(x).shape == (4, 65, 32)
    assert tiny_mae.encode(x, mask).shape == (4, 17, 32)


def test_masked_pixels_never_reach_the_encoder(tiny_mae):
    x = images()
    mask = fixed_mask(tiny_mae)
    x2 = perturb_masked_pixels(x, mask)
    assert not torch.equal(x, x2)
    assert torch.equal(tiny_mae.encode(x, mask), tiny_mae.encode(x2, mask))
    # The decoder's input from the encoder (the loss's encoder inputs) is unchanged too.
    seen = []
    hook = tiny_mae.decoder.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    tiny_mae(x, mask=mask), tiny_mae(x2, mask=mask)
    hook.remove()
    assert torch.equal(seen[0], seen[1])
    # And by gradient: the encoder output has exactly zero derivative w.r.t. masked pixels.
    xg = x.clone().requires_grad_(True)
    tiny_mae.encode(xg, mask).sum().backward()
    pix = mask.view(-1, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(x)
    assert (xg.grad[pix] == 0).all() and (xg.grad[~pix] != 0).any()


def test_loss_counts_masked_patches_only(tiny_mae):
    x = images()
    mask = fixed_mask(tiny_mae)
    pred = tiny_mae(x, mask=mask).pred.detach()
    noisy = pred + torch.randn_like(pred) * (~mask).unsqueeze(-1)  # change visible predictions only
    assert torch.allclose(tiny_mae.loss(x, pred, mask), tiny_mae.loss(x, noisy, mask))
    target = tiny_mae.target(x)
    manual = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert torch.allclose(tiny_mae.loss(x, pred, mask), manual)


def test_norm_pix_target_is_standardised_per_patch(tiny_mae):
    x = images() * 3 + 1
    t = tiny_mae.target(x)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 64), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(4, 64), atol=1e-3)  # unbiased var, +1e-6
    tiny_mae.norm_pix_loss = False
    assert torch.equal(tiny_mae.target(x), patchify(x, 4))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_inverts_the_target(tiny_mae, norm_pix):
    """A perfect prediction reconstructs the original image, de-normalised correctly."""
    tiny_mae.norm_pix_loss = norm_pix
    x = images()
    out = tiny_mae(x, mask=fixed_mask(tiny_mae))
    out.pred = tiny_mae.target(x)
    assert torch.allclose(tiny_mae.reconstruct(x, out), x, atol=1e-4)


def test_same_seed_same_init_mask_and_loss():
    def run(seed):
        L.seed_everything(seed)
        m = MAE(**TINY_MAE)
        return m(images()).loss

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_no_weight_decay_groups(tiny_mae):
    groups = tiny_mae.param_groups(0.05)
    names = {id(p): n for n, p in tiny_mae.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "encoder.cls_token" in free and "decoder.mask_token" in free
    assert all(n.endswith(".bias") or "norm" in n or n.endswith(("token", "pos_embed")) for n in free)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.patch_embed.proj.weight" in decayed
    assert not any("pos_embed" in n for n in decayed | free)  # frozen tables are not optimised at all


def test_frozen_sincos_tables(tiny_mae):
    assert not tiny_mae.encoder.pos_embed.requires_grad and not tiny_mae.decoder.pos_embed.requires_grad


def mae_lr(step, total, warmup, peak, floor=0.0):
    """MAE util/lr_sched.py, per step."""
    if step < warmup:
        return peak * step / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_scaling_and_per_step_schedule(tmp_path):
    L.seed_everything(0)
    model = MAE(**TINY_MAE, optim=dict(blr=1e-3, warmup_epochs=1, min_lr=1e-6))
    dm = MIMDataModule(name="fake", image_size=32, batch_size=8, num_workers=0, fake_size=64)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    lrs = []
    model.on_train_batch_start = lambda batch, i: lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
    trainer.fit(model, datamodule=dm)
    peak = 1e-3 * 8 * 2 / 256  # blr * (batch 8 x accumulation 2) / 256
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_values[0] == pytest.approx(peak)
    total = 3 * 64 // 8 // 2  # 12 optimiser steps, 4 per epoch
    got = [lrs[i] for i in range(0, len(lrs), 2)]  # one value per optimiser step
    want = [mae_lr(s, total, 4, peak, 1e-6) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_non_finite_loss_is_recorded_on_the_device_and_raised_at_the_check(tiny_mae):
    """The step only records the first non-finite loss (reading it there would stall a GPU every step);
    the check raises with the message naming that step and value, and a later finite step does not clear it."""
    bad = images()
    bad[0, 0, 0, 0] = float("nan")
    tiny_mae.log = lambda *a, **k: None
    tiny_mae.training_step((images(), torch.zeros(4)), 0)
    tiny_mae.raise_if_nonfinite()  # finite so far
    tiny_mae.training_step((bad, torch.zeros(4)), 1)  # returns: nothing read back
    tiny_mae.training_step((images(1), torch.zeros(4)), 2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 0; lower optim.blr"):
        tiny_mae.raise_if_nonfinite()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        tiny_mae.on_save_checkpoint({})  # no checkpoint of spoilt weights


def test_non_finite_loss_stops_the_run_at_the_epoch_end_before_any_checkpoint(tmp_path):
    """In a run the guard costs no sync per step: the steps after the bad one run, then the epoch's end
    raises (the step named is the bad one) before ModelCheckpoint writes anything."""
    torch.manual_seed(0)
    model = MAE(**TINY_MAE)
    forward, calls = model.forward, []

    def spoilt_third_step(images, mask=None):
        out = forward(images, mask)
        calls.append(len(calls))
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    model.forward = spoilt_third_step
    dm = MIMDataModule(name="fake", image_size=32, batch_size=8, num_workers=0, fake_size=40)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 2; lower optim.blr"):
        trainer.fit(model, datamodule=dm)
    assert len(calls) == 5  # the whole first epoch ran
    assert not list(tmp_path.rglob("*.ckpt"))


def test_config_errors_are_clear(tiny_mae):
    with pytest.raises(ValueError, match="not divisible by patch size.*patch_size"):
        MAE(encoder=dict(img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="built for"):
        tiny_mae(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"mask ratio must lie in \(0, 1\)"):
        MAE(**TINY_MAE, mask=dict(name="random", ratio=1.2))
    with pytest.raises(KeyError, match="known strategies"):
        MAE(**TINY_MAE, mask=dict(name="checkerboard", ratio=0.5))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        tiny_mae(images(), mask=torch.zeros(4, 64))


def test_missing_data_root_names_the_fix(tmp_path):
    dm = MIMDataModule(name="cifar10", root=str(tmp_path), batch_size=8)
    with pytest.raises(FileNotFoundError, match="MIMZOO_DATA.*data.download=true"):
        dm.prepare_data()


def test_imagenet_geometry_224_patch16():
    model = MAE(
        encoder=dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2),
        decoder=dict(dim=32, depth=1, num_heads=2),
    )
    out = model(torch.randn(2, 3, 224, 224))
    assert model.grid_size == (14, 14) and out.pred.shape == (2, 196, 768) and (out.mask.sum(1) == 147).all()


def test_forward_and_loss_compile_to_one_graph(tiny_mae):
    """``compile=true`` without graph breaks in the hot path: given a mask, encoder, decoder and loss trace as
    one graph (the masked count comes from the strategy, not from reading the mask) and give the eager
    loss. The training forward draws its mask outside the graph, on purpose (``draw_mask`` is
    ``torch.compiler.disable``d): eagerly, so the same seed gives the same mask as without compile.
    Dynamo only (``backend="eager"``: no Inductor code generation), ~5 s on 2 CPU cores."""
    torch._dynamo.reset()
    x, mask = images(), fixed_mask(tiny_mae)
    tiny_mae.eval()  # no drop-path noise between runs
    explain = torch._dynamo.explain(tiny_mae.forward)(x, mask)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    compiled = torch.compile(tiny_mae.forward, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, mask).loss, tiny_mae(x, mask).loss, rtol=1e-6, atol=1e-6)
    tiny_mae.train()
    torch.manual_seed(3)
    drawn = torch.compile(tiny_mae.forward, backend="eager")(x).mask
    torch.manual_seed(3)
    assert torch.equal(drawn, tiny_mae(x).mask)
    torch._dynamo.reset()
