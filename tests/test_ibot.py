"""iBOT: EMA teacher, masking, loss, centring and temperatures, head, multi-crop, collapse signals,
and the whole run through the Hydra entry points (train, resume, kNN eval, export)."""

import copy
import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TINY_IBOT
from mimzoo import masking
from mimzoo.data import MIMDataModule, MultiCrop
from mimzoo.methods import iBOT
from mimzoo.methods.ibot import collapse_diagnosis
from mimzoo.nn import IBOTHead
from mimzoo.optim import cosine_ramp

ENC = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)
MASK = dict(name="ibot", ratio=0.3, ratio_var=0.2)


def tiny_ibot(**kwargs):
    torch.manual_seed(0)
    return iBOT(**{"encoder": ENC, "head": HEAD, "mask": MASK, **kwargs})


def crops(batch=4, local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 12, 12, generator=g) for _ in range(local)
    ]


def fixed_masks(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 64, generator=g) < 0.4 for _ in range(2)]


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the EMA teacher ------------------------------------------------------------------------------
class Capture(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher_before = state(pl_module.teacher)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.student_after, self.teacher_after = state(pl_module.student), state(pl_module.teacher)
        self.teacher_grads = [p.grad for p in pl_module.teacher.parameters()]


def fit_tiny(model, steps=1, callbacks=(), **trainer_kwargs):
    dm = MIMDataModule("cifar10-mini", batch_size=16, num_workers=0)
    dm.train_views = {**model.train_views, "blur": False}
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


def test_ema_update_after_a_step_and_teacher_gets_no_gradients():
    model, cap = tiny_ibot(views=dict(local_number=1), freeze_last_layer_epochs=0), Capture()
    fit_tiny(model, steps=1, callbacks=[cap])
    m = model.momentum_at(0)
    assert m == pytest.approx(0.996)
    assert all(g is None for g in cap.teacher_grads) and not any(p.requires_grad for p in model.teacher.parameters())
    moved = 0
    for name, after in cap.teacher_after.items():
        expected = m * cap.teacher_before[name] + (1 - m) * cap.student_after[name]
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
        moved += not torch.equal(after, cap.teacher_before[name])
    assert moved > 10  # the student really moved, so the check is not on untouched copies


def test_teacher_starts_as_the_student_and_momentum_is_a_per_step_cosine():
    model = tiny_ibot()
    for (name, t), s in zip(model.teacher.state_dict().items(), model.student.state_dict().values()):
        assert torch.equal(t, s), name
    assert cosine_ramp(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_ramp(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_ramp(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum"):
        tiny_ibot(momentum=1.2)


# --- masking and the MIM loss ---------------------------------------------------------------------
def test_student_encode_ignores_masked_pixels():
    model = tiny_ibot().eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 10:30] = True
    changed = images.clone()
    pix = torch.zeros(2, 64, dtype=torch.bool)
    pix[:, 10:30] = True
    pixel_mask = pix.view(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(images)
    changed[pixel_mask] = 1e4
    assert torch.equal(model.encode(images, mask), model.encode(changed, mask))
    assert not torch.equal(model.encode(images), model.encode(changed))  # unmasked, the change is seen
    x = images.clone().requires_grad_(True)
    model.encode(x, mask).sum().backward()
    assert x.grad[pixel_mask].abs().max() == 0 and x.grad[~pixel_mask].abs().max() > 0


def manual_mim(s_patch, t_patch, mask, center, tau_t, tau_s):
    """iBOTLoss's patch term written out per image."""
    terms = []
    for q in range(2):
        sl = slice(q * 4, (q + 1) * 4)
        p = F.softmax((t_patch[sl] - center) / tau_t, -1)
        ce = -(p * F.log_softmax(s_patch[sl] / tau_s, -1)).sum(-1)
        per_image = [(ce[b][mask[sl][b]].sum() / max(int(mask[sl][b].sum()), 1)) for b in range(4)]
        terms.append(torch.stack(per_image).mean())
    return torch.stack(terms).mean()


def test_mim_loss_uses_masked_positions_only_and_matches_the_formula():
    model = tiny_ibot()
    g = torch.Generator().manual_seed(1)
    s_cls, t_cls = torch.randn(12, 64, generator=g), torch.randn(8, 64, generator=g)
    s_patch, t_patch = torch.randn(8, 64, 64, generator=g), torch.randn(8, 64, 64, generator=g)
    mask = torch.rand(8, 64, generator=g) < 0.3
    mask[3] = False  # an unmasked image adds 0 but still counts in the batch mean
    _, mim, _ = model.loss(s_cls, s_patch, t_cls, t_patch, mask)
    torch.testing.assert_close(mim, manual_mim(s_patch, t_patch, mask, model.center_patch, 0.07, 0.1))
    noise = torch.randn(8, 64, 64, generator=g) * (~mask).unsqueeze(-1)
    _, mim2, _ = model.loss(s_cls, s_patch + noise, t_cls, t_patch + noise, mask)
    torch.testing.assert_close(mim, mim2)  # visible positions change nothing
    _, mim3, _ = model.loss(s_cls, s_patch + 3 * noise.roll(1, 1), t_cls, t_patch, mask)
    assert not torch.allclose(mim, mim3)


@pytest.mark.parametrize("shared_head", [True, False])
def test_patch_heads_run_on_masked_tokens_only_with_the_all_token_loss_gradients_and_centre(shared_head):
    """The student's patch head (MLP, last layer, log-softmax) and the teacher's last layer and softmax
    see the M masked tokens only, not all 2B x N; the loss, its parts and the updated centres equal the
    all-token computation (our heads on every token + the official iBOTLoss) to 1e-6, and so does every
    gradient (up to fp32 summation order).
    Masks with variable counts, one image with none and one fully masked."""
    from reference_ibot import iBOTLoss

    model = tiny_ibot(
        drop_path_rate=0.0,
        views=dict(local_number=2),
        head={**HEAD, "shared_head": shared_head, "patch_out_dim": None if shared_head else 48},
    )
    model.center.normal_(0, 0.1)
    model.center_patch.normal_(0, 0.1)  # non-zero centres, so the centring is checked too
    model.train()
    reference = copy.deepcopy(model)
    views, masks = crops(batch=4, local=2), fixed_masks()
    masks[0][1] = False  # an unmasked image: adds 0, still counts in its view's mean
    masks[1][2] = True  # a fully masked one
    rows = {"student": [], "teacher": [], "student_mlp": []}  # tokens per call (shared heads: [CLS] calls too)
    for name, module in (
        ("student", model.student_head.last_layer2),
        ("teacher", model.teacher_head.last_layer2),
        ("student_mlp", model.student_head.mlp),
    ):
        module.register_forward_hook(lambda m, args, out, name=name: rows[name].append(args[0].shape[:-1].numel()))
    out = model(views, [m.clone() for m in masks])
    out.loss.backward()
    num_masked = int(torch.cat(masks).sum())
    assert 0 < num_masked < 2 * 4 * 64
    for name in ("student", "teacher"):  # patches: the M masked tokens, not all 2 x 4 x 64 (+ [CLS] calls: 8)
        assert num_masked in rows[name] and set(rows[name]) <= {num_masked, 8}, rows
    assert sum(rows["student_mlp"]) == 8 + num_masked + 8  # global [CLS], masked patches, local [CLS]

    # the all-token computation: every head on every token, then iBOTLoss as main_ibot.py has it
    ref = reference
    globals_ = torch.cat(views[:2])
    with torch.no_grad():
        t_cls, t_patch = ref.teacher_head(ref.teacher.forward_masked(globals_))
    s_cls, s_patch = ref.student_head(ref.student.forward_masked(globals_, torch.cat(masks)))
    s_local = ref.student_head(ref.student.forward_masked(torch.cat(views[2:])))[0]
    k2 = s_patch.shape[-1]
    official = iBOTLoss(64, k2, 2, 2, 0.04, 0.07, 0.04, 0.07, 30, 100)
    official.center, official.center2 = ref.center.clone(), ref.center_patch.clone()
    expected = official((s_cls, s_patch), (t_cls, t_patch), s_local, [m.view(4, 8, 8) for m in masks], 99)
    expected["loss"].backward()
    for ours, theirs in (
        (out.loss, expected["loss"]),
        (out.logs["loss_cls"], expected["cls"]),
        (out.logs["loss_mim"], expected["patch"]),
        (model.center, official.center),
        (model.center_patch, official.center2),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # the same loss from model.loss given every position (what the old forward computed)
    _, mim_all, _ = ref.loss(torch.cat([s_cls, s_local]), s_patch, t_cls, t_patch, torch.cat(masks))
    torch.testing.assert_close(out.logs["loss_mim"], mim_all, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) > 10
    for name, p in model.named_parameters():
        if name in grads:
            # relative to the tensor's norm: fp32 sums the rows in another order (float64 agrees to 1e-13)
            error = (p.grad - grads[name]).norm() / grads[name].norm().clamp_min(1e-12)
            assert error < 1e-6, (name, float(error))
        else:
            assert p.grad is None or not p.grad.any(), name


def test_cls_loss_averages_all_cross_view_pairs():
    model = tiny_ibot()
    g = torch.Generator().manual_seed(2)
    s_cls, t_cls = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)  # 4 views of 4 images
    patch = torch.zeros(8, 64, 64)
    cls, _, entropy = model.loss(s_cls, patch, t_cls, patch, torch.zeros(8, 64, dtype=torch.bool))
    p = F.softmax(t_cls / 0.07, -1).chunk(2)
    log_q = F.log_softmax(s_cls / 0.1, -1).chunk(4)
    pairs = [-(p[q] * log_q[v]).sum(-1).mean() for q in range(2) for v in range(4) if v != q]
    assert len(pairs) == 6
    torch.testing.assert_close(cls, torch.stack(pairs).mean())
    torch.testing.assert_close(entropy, -(torch.cat(p) * torch.cat(p).log()).sum(-1).mean())


def test_constant_teacher_output_gives_the_uniform_target_after_centring():
    model = tiny_ibot()
    constant = torch.randn(1, 64).expand(8, 64) * 5
    patches = torch.randn(1, 1, 64).expand(8, 64, 64) * 5
    before = F.softmax((constant - model.center) / 0.04, -1)
    assert before.max() > 0.5  # sharp before centring
    for _ in range(200):
        model.update_center(constant, patches)
    torch.testing.assert_close(model.center, constant[:1], atol=1e-4, rtol=0)
    target = F.softmax((constant - model.center) / 0.04, -1)
    torch.testing.assert_close(target, torch.full_like(target, 1 / 64), atol=1e-3, rtol=0)
    target_patch = F.softmax((patches - model.center_patch) / 0.04, -1)
    torch.testing.assert_close(target_patch, torch.full_like(target_patch, 1 / 64), atol=1e-3, rtol=0)
    # One update moves the centre by (1 - m) of the gap, m = 0.9.
    fresh = tiny_ibot()
    fresh.update_center(constant, patches)
    torch.testing.assert_close(fresh.center, 0.1 * constant[:1])


class Temps(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(pl_module.teacher_temps())


def test_sharpening_and_per_step_teacher_temperature_warm_up():
    logits = torch.randn(4, 64)
    entropy = lambda t: -(F.softmax(logits / t, -1) * F.log_softmax(logits / t, -1)).sum(-1).mean()  # noqa: E731
    assert entropy(0.04) < entropy(0.07) < entropy(0.1)
    model = tiny_ibot(
        warmup_teacher_temp_epochs=2,
        teacher_temp=0.07,
        teacher_patch_temp=0.05,
        warmup_teacher_patch_temp=0.03,
        teacher_temp_schedule="per_step",
    )
    assert model.teacher_temps() == (0.07, 0.05)  # outside a trainer: the final values
    temps = Temps()
    fit_tiny(model, steps=-1, max_epochs=4, limit_train_batches=2, callbacks=[temps])  # warm-up: 4 of 8 steps
    assert [t for t, _ in temps.seen] == pytest.approx([0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07, 0.07, 0.07])
    assert [t for _, t in temps.seen] == pytest.approx([0.03, 0.035, 0.04, 0.045, 0.05, 0.05, 0.05, 0.05])


@pytest.mark.parametrize("warmup_epochs", [30, 1, 0])
def test_official_teacher_temperature_schedule_is_main_ibot_s(warmup_epochs):
    """``teacher_temp_schedule=official`` (model=ibot's default) is iBOTLoss's per-epoch arrays, for the
    [CLS] and the patch temperature with its own warm-up start: 0.0503 at epoch 10 of a 30-epoch warm-up
    (per_step: 0.0500), the final value at epoch W-1; W=1 keeps the warm value for epoch 0."""
    from reference_ibot import iBOTLoss

    official = iBOTLoss(
        64,
        64,
        2,
        0,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp2=0.03,
        teacher_temp2=0.06,
        warmup_teacher_temp_epochs=warmup_epochs,
        nepochs=100,
    )
    model = tiny_ibot(
        teacher_temp=0.07,
        teacher_patch_temp=0.06,
        warmup_teacher_temp=0.04,
        warmup_teacher_patch_temp=0.03,
        warmup_teacher_temp_epochs=warmup_epochs,
    )
    assert model.hparams.teacher_temp_schedule == "official"
    ours = [model.teacher_temps(epoch=e) for e in range(100)]
    assert [t for t, _ in ours] == official.teacher_temp_schedule.tolist()
    assert [t for _, t in ours] == official.teacher_temp2_schedule.tolist()
    if warmup_epochs == 30:
        assert ours[10][0] == pytest.approx(0.0503448, abs=1e-7) and ours[29][0] == 0.07
        per_step = tiny_ibot(teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_temp_schedule="per_step")
        assert per_step.teacher_temps(epoch=10)[0] == pytest.approx(0.05) and per_step.teacher_temps(29)[0] < 0.07
    with pytest.raises(ValueError, match="whole epochs"):
        tiny_ibot(warmup_teacher_temp_epochs=2.5)


def test_official_teacher_temperature_is_constant_within_an_epoch_in_training():
    model = tiny_ibot(warmup_teacher_temp_epochs=3, teacher_temp=0.07, teacher_patch_temp=0.07)
    temps = Temps()
    fit_tiny(model, steps=-1, max_epochs=4, limit_train_batches=2, callbacks=[temps])
    assert [t for t, _ in temps.seen] == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07])


def test_ibot_mask_rule():
    strategy = masking.build("ibot", ratio=0.3, ratio_var=0.2)
    masks = strategy(2000, (14, 14), generator=torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    unmasked = (counts == 0).float().mean()
    assert 0.45 < unmasked < 0.55
    masked = counts[counts > 0].float() / 196
    assert masked.min() >= 0.07 and masked.max() <= 0.5 and 0.25 < masked.mean() < 0.32
    again = strategy(2000, (14, 14), generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    rand = masking.build("ibot", ratio=0.3, ratio_var=0.2, shape="rand", skip_prob=0.0)
    c = rand(500, (14, 14), generator=torch.Generator().manual_seed(0)).sum(1)
    assert c.min() >= int(0.1 * 196) and c.max() <= int(0.5 * 196)
    with pytest.raises(ValueError, match="ratio_var"):
        masking.build("ibot", ratio=0.3, ratio_var=0.4)


# --- head, views, optimisation details ------------------------------------------------------------
def test_head_shapes_sharing_and_frozen_norm():
    shared = IBOTHead(32, out_dim=64, hidden_dim=32, bottleneck_dim=16, shared_head=True, norm_last_layer=True)
    cls, patch = shared(torch.randn(2, 5, 32))
    assert cls.shape == (2, 64) and patch.shape == (2, 4, 64) and shared.last_layer2 is shared.last_layer
    g = shared.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    w = shared.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))  # weight-normalised rows of norm g = 1
    separate = IBOTHead(
        32, out_dim=64, patch_out_dim=48, hidden_dim=32, bottleneck_dim=16, shared_head=False, norm_last_layer=False
    )
    cls, patch = separate(torch.randn(2, 5, 32))
    assert patch.shape == (2, 4, 48) and separate.last_layer2 is not separate.last_layer
    assert separate.last_layer.parametrizations.weight.original0.requires_grad


def test_teacher_head_sharing_is_its_own_flag_and_the_ema_pairs_parameters_by_name():
    """main_ibot.py's defaults: ``--shared_head false`` (student) and ``--shared_head_teacher true``. The
    teacher's one last layer then follows the student's ``[CLS]`` layer (the names both have), as the
    official ``names_common`` EMA; the student's ``last_layer2`` has no teacher counterpart."""
    model = tiny_ibot(head={**HEAD, "shared_head": False, "shared_head_teacher": True})
    assert model.teacher_head.last_layer2 is model.teacher_head.last_layer
    assert model.student_head.last_layer2 is not model.student_head.last_layer
    follows = tiny_ibot(head={**HEAD, "shared_head": False}).teacher_head  # shared_head_teacher null: as the student
    assert follows.last_layer2 is not follows.last_layer
    with torch.no_grad():
        for p in model.student_head.parameters():
            p.add_(torch.randn_like(p))
    before = state(model.teacher_head)
    model.update_teacher(0.9)
    student = state(model.student_head)
    for name, after in state(model.teacher_head).items():
        source = name.replace("last_layer2", "last_layer")  # the shared layer under its second name
        torch.testing.assert_close(after, 0.9 * before[name] + 0.1 * student[source])


def test_multicrop_views():
    from PIL import Image

    tf = MultiCrop(32, local_size=12, local_number=3, blur=True)
    views = tf(Image.new("RGB", (32, 32), (120, 30, 200)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 3
    assert tiny_ibot(views=dict(local_number=3)).train_views["local_size"] == 12  # 3/7 of 32, multiple of 4


def test_last_layer_frozen_in_the_first_epoch_and_per_tensor_clipping():
    model = tiny_ibot(clip_grad=1e-3)
    last = [p.detach().clone() for p in model.student_head.last_layer_parameters() if p.requires_grad]
    first = model.student.blocks[0].attn.qkv.weight.detach().clone()
    fit_tiny(model, steps=1)
    trainable = [p for p in model.student_head.last_layer_parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(last, trainable))
    assert not torch.equal(first, model.student.blocks[0].attn.qkv.weight)
    model.zero_grad()
    model.encode(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    model.configure_gradient_clipping(None)
    norms = [p.grad.norm() for p in model.student.parameters() if p.grad is not None]
    assert max(norms) <= 1e-3 * (1 + 1e-4) and len(norms) > 10


def test_weight_decay_follows_its_cosine():
    model = tiny_ibot(optim=dict(weight_decay=0.04, weight_decay_end=0.4, warmup_epochs=0))
    trainer = fit_tiny(model, steps=3)
    groups = trainer.optimizers[0].param_groups
    decayed = [g for g in groups if g["decayed"]]
    assert len(decayed) == 1 and all(g["weight_decay"] == 0 for g in groups if not g["decayed"])
    assert decayed[0]["weight_decay"] == pytest.approx(cosine_ramp(2, 3, 0.04, 0.4))  # set before the last step


def test_collapse_diagnosis():
    assert collapse_diagnosis(entropy=2.0, kl=0.5, num_prototypes=64) is None
    assert "uniform" in collapse_diagnosis(entropy=math.log(64) - 1e-3, kl=1e-6, num_prototypes=64)
    assert "one dimension" in collapse_diagnosis(entropy=1e-3, kl=1e-6, num_prototypes=64)


def test_forward_logs_collapse_signals_and_rejects_single_tensors():
    model = tiny_ibot()
    out = model(crops(), fixed_masks())
    for key in ("loss_cls", "loss_mim", "teacher_entropy", "teacher_student_kl", "teacher_cls_std", "mask_ratio"):
        assert torch.isfinite(out.logs[key]), key
    assert out.logs["teacher_student_kl"] >= 0 and 0 < out.logs["teacher_entropy"] <= math.log(64)
    with pytest.raises(ValueError, match="list of views"):
        model(torch.randn(2, 3, 32, 32))


# --- positions for crops of another size ---------------------------------------------------------
@pytest.mark.parametrize("size", [(24, 24), (32, 32), (24, 40), (96, 96)])
def test_positions_for_other_crop_sizes_follow_the_official_interpolate_pos_encoding(size):
    """A 64 px, patch-4 model (16 x 16 grid) on 24 / 32 px local crops, a non-square crop (rows and
    columns not swapped) and a larger one: positions and tokens are the official ones, and these are
    sizes where the official ``+ 0.1`` scale factor differs from a plain resize (timm's)."""
    from timm.layers import resample_abs_pos_embed

    from mimzoo.nn import MaskTokenViT
    from reference_ibot import interpolate_pos_encoding, vision_transformer

    torch.manual_seed(0)
    vit = MaskTokenViT(img_size=64, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
    sd = {k.replace("mask_token", "masked_embed"): v.detach() for k, v in vit.state_dict().items()}
    images = torch.randn(2, 3, *size)
    grid = (size[0] // 4, size[1] // 4)
    official = interpolate_pos_encoding(sd, torch.zeros(1, 1 + grid[0] * grid[1], 32), *size)
    with torch.no_grad():
        ours = vit._pos_embed(torch.zeros(1, *grid, 32))  # zero patch embeddings: the positions show
        torch.testing.assert_close(ours[:, 1:], official[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(ours[:, 0], sd["cls_token"][:, 0] + official[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(
            vit.forward_masked(images), vision_transformer(sd, images, num_heads=2), rtol=0, atol=1e-6
        )
    resized = resample_abs_pos_embed(sd["pos_embed"], grid, (16, 16), num_prefix_tokens=1, antialias=False)
    assert (resized - official).abs().max() > 0.1 * sd["pos_embed"].std()  # the quirk matters at these sizes


# --- export and the entry points ------------------------------------------------------------------
def test_export_is_the_teacher_as_a_strict_timm_vit():
    model = tiny_ibot().eval()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))  # teacher != student
    kwargs, sd = model.export_timm()
    vit = timm.create_model(**kwargs)
    vit.load_state_dict(sd, strict=True)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.eval()(images), model.features(images))
    assert not torch.allclose(model.student.forward_masked(images)[:, 0], model.features(images))


@pytest.mark.slow
def test_end_to_end_train_resume_eval_and_export(tmp_path, cli):
    run_dir = tmp_path / "run"
    common = [
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    cli("train", *TINY_IBOT, "trainer.max_epochs=1", *common)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and first["hyper_parameters"]["mask"]["name"] == "ibot"
    assert first["state_dict"]["center"].abs().sum() > 0
    cli("train", *TINY_IBOT, "trainer.max_epochs=2", "ckpt_path=last", *common)
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 6
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for key in (
        "train/loss_cls",
        "train/loss_mim",
        "train/teacher_entropy",
        "train/teacher_student_kl",
        "train/teacher_cls_std",
        "train/ema_momentum",
        "train/teacher_temp",
        "train/weight_decay",
        "train/collapsed",
        "val/loss",
        "probe/knn_top1",
    ):
        assert key in logged, key
    steps = sorted({int(r["step"]) for r in rows if r.get("train/ema_momentum")})
    assert steps[-1] == 5  # the resumed run continued the step count
    out = tmp_path / "eval"
    cli(
        "evaluate",
        "protocol=knn",
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        "data=cifar10_mini",
        "data.num_workers=0",
        "data.batch_size=64",
        f"hydra.run.dir={out}",
    )
    assert 0 <= json.loads((out / "results.json").read_text())["top1"] <= 1
    from mimzoo.checkpoints import export_encoder

    kwargs = export_encoder(run_dir / "checkpoints" / "last.ckpt", tmp_path / "vit.pth")
    timm.create_model(**kwargs).load_state_dict(torch.load(tmp_path / "vit.pth"), strict=True)


def test_model_ibot_composes_its_mask_optimiser_and_views():
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR, build_datamodule, build_model

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_IBOT, "model.views.local_number=3"])
    assert cfg.mask.name == "ibot" and cfg.optim.weight_decay_end == 0.4 and cfg.optim.blr == 5e-4
    assert cfg.model.teacher_temp_schedule == "official" and cfg.model.head.shared_head_teacher is True
    model = build_model(cfg)
    dm = build_datamodule(cfg, model)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape[1:]) for v in images] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 3
    assert Path(CONFIG_DIR, "mask", "ibot.yaml").exists()


# --- official checkpoints and equivalence ---------------------------------------------------------
# Files written as bytedance/ibot writes them (reference_ibot.official_checkpoint: main_ibot.py's save_dict,
# random weights under the official keys), checked against the official step restated from its source.
OFFICIAL_SIZES = dict(img_size=64, embed_dim=32, depth=2, hidden_dim=32, bottleneck_dim=16)  # patch 8: 8 x 8 grid


def official_run_args(**kwargs):
    from reference_ibot import official_args

    return official_args(
        **{
            "arch": "vit_tiny",
            "patch_size": 8,
            "out_dim": 64,
            "patch_out_dim": 64,
            "norm_last_layer": False,
            "teacher_temp": 0.07,
            "local_crops_number": 2,
            "epochs": 100,
            **kwargs,
        }
    )


def official_crops(local_size, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 64, 64, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(2)]
    masks = [torch.rand(batch, 8, 8, generator=g) < 0.4 for _ in range(2)]  # loader.py: one [h, w] per image
    masks[0][1] = False  # an unmasked image, as half of iBOT's are
    masks += [torch.zeros(batch, local_size // 8, local_size // 8, dtype=torch.bool) for _ in range(2)]
    return views, masks


@pytest.mark.parametrize(
    ("shared_head", "shared_head_teacher", "local_size"),
    [(True, True, 24), (False, True, 32), (False, False, 24)],
    ids=["recipe-local24", "defaults-local32", "unshared-local24"],
)
def test_official_training_checkpoint_imports_and_gives_the_official_step(
    tmp_path, shared_head, shared_head_teacher, local_size
):
    """``mimzoo-import ibot checkpoint.pth`` on a main_ibot.py training checkpoint (DDP ``module.``
    student, teacher without ``masked_embed``, ``ibot_loss`` centres, ``args``, optimizer, fp16 scaler):
    on the same crops (24 or 32 px local crops on a 64 px model) and masks, the loss and its [CLS] and
    patch parts, the student's tokens and the updated centres are the official ones to 1e-6."""
    from mimzoo.checkpoints import import_main, load_pretrained
    from reference_ibot import official_checkpoint, train_step

    args = official_run_args(
        shared_head=shared_head,
        shared_head_teacher=shared_head_teacher,
        patch_out_dim=64 if shared_head_teacher else 48,
    )
    ckpt = official_checkpoint(args, **OFFICIAL_SIZES, epoch=40)
    assert "masked_embed" not in str(list(ckpt["teacher"])) and "module.backbone.masked_embed" in ckpt["student"]
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    import_main(["ibot", str(tmp_path / "checkpoint.pth"), str(tmp_path / "ibot.ckpt"), "encoder.num_heads=2"])
    model = load_pretrained(tmp_path / "ibot.ckpt")
    h = model.hparams
    assert (h.head["shared_head"], h.head["shared_head_teacher"]) == (shared_head, shared_head_teacher)
    assert (h.teacher_temp, h.teacher_patch_temp, h.warmup_teacher_patch_temp, h.momentum) == (0.07, 0.07, 0.04, 0.996)
    assert h.views["local_number"] == 2 and h.teacher_temp_schedule == "official"

    views, masks = official_crops(local_size)
    epoch = 40  # past the 30 warm-up epochs: the final temperatures, which ours uses outside a trainer
    official, student_global, student_local, official_loss = train_step(ckpt, views, masks, epoch, num_heads=2)
    model.train()
    model.student.drop_path_rate = 0.0
    for block in model.student.blocks:  # the official step with drop-path off, to compare one forward
        block.drop_path1 = block.drop_path2 = torch.nn.Identity()
    out = model(views, [m.flatten(1) for m in masks[:2]])
    for ours, theirs in (
        (out.loss, official["loss"]),
        (out.logs["loss_cls"], official["cls"]),
        (out.logs["loss_mim"], official["patch"]),
        (model.center, official_loss.center),
        (model.center_patch, official_loss.center2),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            model.student.forward_masked(torch.cat(views[:2]), torch.cat(masks[:2]).flatten(1)),
            student_global,
            rtol=1e-6,
            atol=1e-6,
        )
        torch.testing.assert_close(
            model.student.forward_masked(torch.cat(views[2:])), student_local, rtol=1e-6, atol=1e-6
        )


def test_official_checkpoint_weights_land_on_our_names(tmp_path):
    """Every official tensor lands where the importer says: backbones (``masked_embed`` -> student's
    ``mask_token``; the teacher, which has none, gets the student's), heads (``weight_g``/``weight_v``),
    centres (``center2`` -> ``center_patch``)."""
    from mimzoo.checkpoints import load_official
    from reference_ibot import official_checkpoint

    ckpt = official_checkpoint(official_run_args(shared_head=False), **OFFICIAL_SIZES)
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    ours = load_official("ibot", tmp_path / "checkpoint.pth", encoder={"num_heads": 2}).state_dict()
    student = {k[len("module.") :]: v for k, v in ckpt["student"].items()}
    for name, part in (("student", student), ("teacher", ckpt["teacher"])):
        for k, v in part.items():
            k = (
                k.replace("backbone.", f"{name}.")
                .replace("head.", f"{name}_head.")
                .replace("masked_embed", "mask_token")
                .replace("weight_g", "parametrizations.weight.original0")
                .replace("weight_v", "parametrizations.weight.original1")
            )
            assert torch.equal(ours[k].reshape(v.shape), v), k
    assert torch.equal(ours["teacher.mask_token"], ours["student.mask_token"])
    assert torch.equal(ours["center"], ckpt["ibot_loss"]["center"])
    assert torch.equal(ours["center_patch"], ckpt["ibot_loss"]["center2"])


@pytest.mark.parametrize("release", ["checkpoint_teacher", "extracted_student"])
def test_official_backbone_release_imports_both_backbones(tmp_path, release):
    """The released ``checkpoint_teacher.pth`` (``{"state_dict": teacher backbone}``, no ``masked_embed``)
    and ``extract_backbone_weights.py --checkpoint_key student`` output (bare, with ``masked_embed``):
    both backbones are the file's, tokens the official ones on global and 24 px crops."""
    from mimzoo.checkpoints import load_official
    from reference_ibot import official_checkpoint, vision_transformer

    ckpt = official_checkpoint(official_run_args(), **OFFICIAL_SIZES)
    if release == "checkpoint_teacher":
        backbone = {k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
        saved = {"state_dict": backbone}
    else:
        backbone = {
            k[len("module.backbone.") :]: v for k, v in ckpt["student"].items() if k.startswith("module.backbone")
        }
        saved = backbone
    torch.save(saved, tmp_path / f"{release}.pth")
    with pytest.warns(UserWarning, match="backbone only"):
        model = load_official("ibot", tmp_path / f"{release}.pth", encoder={"num_heads": 2}, head=HEAD)
    expected_mask_token = backbone.get("masked_embed", torch.zeros(1, 32))  # the official initial value
    for vit in (model.student, model.teacher):
        assert torch.equal(vit.mask_token.reshape(1, 32), expected_mask_token)
    with torch.no_grad():
        for size in (64, 24):
            images = torch.randn(2, 3, size, size)
            torch.testing.assert_close(
                model.teacher.forward_masked(images), vision_transformer(backbone, images, 2), rtol=0, atol=1e-6
            )
            torch.testing.assert_close(
                model.student.forward_masked(images), vision_transformer(backbone, images, 2), rtol=0, atol=1e-6
            )
    del backbone["blocks.1.mlp.fc2.weight"]
    torch.save(backbone, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_official("ibot", tmp_path / "broken.pth", encoder={"num_heads": 2}, head=HEAD)
