"""Self-Guided MAE: Ncut on planted partitions, informed masks (object first, exact count, seeds,
fallback), a feature pass that leaves the gradients alone, the exploitation rate and switch rule,
and end to end through mimzoo-train (switch, pictures, resume) and mimzoo-eval."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_MAE
from mimzoo import masking
from mimzoo.masking import ncut_bipartition
from mimzoo.methods import SGMAE
from mimzoo.methods.sgmae import (
    attention_rollout,
    exploit_condition,
    exploitation_rates,
    recorded_attention,
    switch_epoch,
)
from mimzoo.nn import patchify

GRID = (8, 8)


def planted(b=3, n=64, noise=0.1, seed=0):
    """Similarities of two planted groups per image (0.8 within, -0.1 across, plus symmetric noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(n, generator=g) < (12 + 9 * i) for i in range(b)])
    s = torch.where(labels.unsqueeze(2) == labels.unsqueeze(1), 0.8, -0.1) + noise * torch.randn(b, n, n, generator=g)
    return 0.5 * (s + s.mT), labels


def same_split(part, labels):
    return bool(((part == labels).all(-1) | (part == ~labels).all(-1)).all())


# --- Normalized Cut ---------------------------------------------------------------------------------
def test_ncut_recovers_planted_blocks_batched():
    s, labels = planted()
    bip = ncut_bipartition(s)
    assert bip.part.shape == (3, 64) and bip.valid.all() and same_split(bip.part, labels)
    assert same_split(ncut_bipartition(s[1]).part.unsqueeze(0), labels[1:2])  # one [N, N] matrix too
    assert not same_split(torch.rand(3, 64) > 0.5, labels)  # the check itself can fail


def test_ncut_solves_the_generalised_problem_like_tokencut():
    """y = D^-1/2 u2 is TokenCut's scipy.linalg.eigh(D - W, D) second eigenvector (up to sign and scale)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s, _ = planted(b=1, noise=0.3)
    w = masking.self_guided.affinity(s[0]).double()
    d = torch.diag(w.sum(1))
    _, vec = scipy_linalg.eigh((d - w).numpy(), d.numpy(), subset_by_index=[1, 1])
    ours = ncut_bipartition(s).fiedler[0].double()
    assert abs(F.cosine_similarity(ours, torch.from_numpy(vec[:, 0]), dim=0)) > 0.999


def test_ncut_runs_in_fp32_under_autocast():
    s, labels = planted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bip = ncut_bipartition(s.bfloat16())
    assert bip.fiedler.dtype == torch.float32 and same_split(bip.part, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_ncut_on_gpu_matches_cpu():
    s, labels = planted()
    with torch.autocast("cuda", dtype=torch.float16):
        bip = ncut_bipartition(s.cuda().half())
    assert bip.part.is_cuda and bip.fiedler.dtype == torch.float32 and same_split(bip.part.cpu(), labels)


# --- informed masks ---------------------------------------------------------------------------------
def textured_images(b=8, size=3, seed=0):
    """An object square (``size`` x ``size`` patches, checkerboard in green) on a striped red background,
    at a random patch-aligned place; returns the images [B, 3, 32, 32] and the object patches [B, 64]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    background = torch.zeros(3, 32, 32)
    background[0] = (xx % 2) * 2.0 - 1  # vertical stripes
    obj_texture = torch.zeros(3, 32, 32)
    obj_texture[1] = ((xx + yy) % 2) * 2.0 - 1  # checkerboard
    images, objects = [], []
    for _ in range(b):
        top, left = (int(torch.randint(1, 8 - size, (), generator=g)) for _ in range(2))
        grid = torch.zeros(8, 8, dtype=torch.bool)
        grid[top : top + size, left : left + size] = True
        pix = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
        images.append(torch.where(pix, obj_texture, background) + 0.2 * torch.randn(3, 32, 32, generator=g))
        objects.append(grid.flatten())
    return torch.stack(images), torch.stack(objects)


def pixel_features(images):
    """Honest, model-free features: the raw pixels of each patch (the two textures are near-orthogonal)."""
    return patchify(images, 4)


@pytest.mark.parametrize("fill", ["rank", "object_then_random"])
@pytest.mark.parametrize("rule", ["seed", "low_mean_sim", "smaller"])
def test_informed_mask_covers_the_object_first(fill, rule):
    images, objects = textured_images()
    strategy = masking.build("self_guided", ratio=0.75, fill=fill, object_rule=rule, hint_ratio=0.0)
    out = strategy.build(GRID, torch.Generator().manual_seed(0), features=pixel_features(images))
    assert not out.fallback.any() and torch.equal(out.object_part, objects)
    assert (out.mask | ~objects).all()  # every object patch is masked
    random = masking.build("random", ratio=0.75)(8, GRID, torch.Generator().manual_seed(0))
    assert not (random | ~objects).all()  # a random mask does not do that


def test_object_larger_than_background_needs_the_corner_check():
    images, objects = textured_images(size=6)  # 36 object patches: the background is the smaller side
    features = pixel_features(images)
    with_check = masking.build("self_guided", hint_ratio=0.0).build(GRID, features=features)
    without = masking.build("self_guided", hint_ratio=0.0, corner_check=False).build(GRID, features=features)
    assert torch.equal(with_check.object_part, objects) and (with_check.mask | ~objects).all()
    assert torch.equal(without.object_part, ~objects)


def test_hints_reveal_object_patches_and_keep_the_count():
    images, objects = textured_images()
    out = masking.build("self_guided", hint_ratio=0.1, hint_select="high_score").build(
        GRID, torch.Generator().manual_seed(0), features=pixel_features(images)
    )
    assert (out.hints.sum(1) == 5).all() and not (out.hints & out.mask).any()  # round(0.1 * 48) revealed
    assert (out.hints <= objects).all() and (out.mask | out.hints | ~objects).all()
    assert (out.mask.sum(1) == 48).all()


@pytest.mark.parametrize("fill", ["rank", "object_then_random"])
@pytest.mark.parametrize("hint_select", ["random", "low_score", "high_score"])
@pytest.mark.parametrize("hint_remask", ["random", "next_rank"])
@pytest.mark.parametrize("ratio,hint_ratio", [(0.75, 0.0), (0.75, 0.1), (0.75, 1.0), (0.5, 0.25), (0.9, 0.5)])
def test_exact_masked_count(fill, hint_select, hint_remask, ratio, hint_ratio):
    strategy = masking.build(
        "self_guided", ratio=ratio, fill=fill, hint_ratio=hint_ratio, hint_select=hint_select, hint_remask=hint_remask
    )
    features = torch.randn(6, 64, 16, generator=torch.Generator().manual_seed(1))
    features[0] = 1.0  # a degenerate image (random fallback) in the batch too
    out = strategy.build(GRID, torch.Generator().manual_seed(0), features=features)
    k = round(ratio * 64)
    assert out.mask.dtype == torch.bool and (out.mask.sum(1) == k).all()
    assert (out.hints[1:].sum(1) == min(round(hint_ratio * k), 64 - k)).all() and not (out.hints & out.mask).any()


def test_same_seed_same_mask():
    strategy = masking.build("self_guided", hint_ratio=0.2)
    features = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1))
    draw = lambda seed: strategy(4, GRID, torch.Generator().manual_seed(seed), features=features)  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_degenerate_graph_falls_back_to_random_and_is_counted():
    features = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1))
    features[0], features[2] = 1.0, torch.tensor([0.5] * 16)  # constant features: every edge the same
    strategy = masking.build("self_guided", graph="soft", hint_ratio=0.0)
    a = strategy.build(GRID, torch.Generator().manual_seed(0), features=features)
    b = strategy.build(GRID, torch.Generator().manual_seed(1), features=features)
    assert a.fallback.tolist() == [True, False, True, False] and a.fallback_rate == 0.5
    assert (a.mask.sum(1) == 48).all() and not a.hints[[0, 2]].any()
    assert not torch.equal(a.mask[0], b.mask[0]) and torch.equal(a.mask[1], b.mask[1])  # random only where degenerate


def test_registry_call_convention_and_clear_errors():
    assert "self_guided" in masking.available()
    strategy = masking.build("self_guided")
    features = torch.randn(2, 64, 8)
    assert torch.equal(
        strategy(2, GRID, torch.Generator().manual_seed(0), features=features),
        strategy.build(GRID, torch.Generator().manual_seed(0), features=features).mask,
    )
    e = F.normalize(features, dim=-1)
    assert torch.equal(
        strategy(2, GRID, torch.Generator().manual_seed(0), similarity=e @ e.mT),
        strategy(2, GRID, torch.Generator().manual_seed(0), features=features),
    )
    plain = strategy.build(GRID, torch.Generator().manual_seed(0), batch_size=3)  # the registry's plain call:
    assert plain.fallback.all() and (plain.mask.sum(1) == 48).all()  # nothing to inform it, random and counted
    assert torch.equal(strategy(3, GRID, torch.Generator().manual_seed(0)), plain.mask)
    with pytest.raises(ValueError, match="not both"):
        strategy(2, GRID, features=features, similarity=e @ e.mT)
    with pytest.raises(ValueError, match="unknown fill"):
        masking.build("self_guided", fill="object+everything")


# --- the method: feature pass, training forward, rates, switch ---------------------------------------
def tiny_sgmae(**kwargs):
    torch.manual_seed(0)
    encoder = {**TINY_MAE["encoder"], "drop_path_rate": 0.2}  # drop-path: train mode would consume RNG
    return SGMAE(encoder=encoder, decoder=TINY_MAE["decoder"], **kwargs)


def grads(model, images, mask):
    model.zero_grad()
    model(images, mask=mask).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_feature_pass_has_no_grad_and_leaves_the_loss_gradients_alone():
    model = tiny_sgmae().train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = model.informed_mask(images, torch.Generator().manual_seed(0)).mask
    torch.manual_seed(5)
    reference = grads(model, images, mask)
    torch.manual_seed(5)
    features = model.patch_features(images)
    assert features.shape == (4, 64, 32) and not features.requires_grad and features.grad_fn is None
    assert model.encoder.training and all(m.training for m in model.encoder.modules())  # train mode restored
    after = grads(model, images, mask)
    assert reference.keys() == after.keys() and all(torch.equal(reference[k], after[k]) for k in reference)
    torch.manual_seed(5)
    with torch.no_grad():
        model.encoder.forward_features(images)  # the same pass in *train* mode draws drop-path noise ...
    changed = grads(model, images, mask)
    assert any(not torch.equal(reference[k], changed[k]) for k in reference)  # ... which the test would see


@pytest.mark.parametrize("emb_layer", [0, -1])
def test_feature_pass_runs_in_inference_mode_under_the_runs_autocast_with_the_same_masks(emb_layer):
    """The feature pass is an inference-mode pass (no autograd bookkeeping at all), under whatever autocast
    the step runs in (bf16 here), and gives the features and the informed masks the no-grad pass gave."""
    model = tiny_sgmae(emb_layer=emb_layer).train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = model.patch_features(images)
    assert features.is_inference() and model.encoder.training
    model.encoder.eval()
    with torch.no_grad():  # the pass as it was: no_grad, eval mode
        depth = len(model.encoder.blocks)
        before = model.encoder.forward_intermediates(
            images,
            indices=[emb_layer % depth],
            norm=emb_layer == -1,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]
    model.encoder.train()
    assert torch.equal(features, before)
    for seed in range(3):
        mask = model.informed_mask(images, torch.Generator().manual_seed(seed)).mask
        expected = model.informed_strategy.build(GRID, torch.Generator().manual_seed(seed), features=before).mask
        assert torch.equal(mask, expected)
    dtypes = []
    model.encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.patch_features(images)
        assert dtypes == [torch.bfloat16]  # the pass's matmuls ran in the step's bf16
        model.sg_informed.fill_(True)
        model(images).loss.backward()  # the informed training step, on the inference-mode features' mask
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())


def test_feature_layer_and_training_forward_use_the_informed_mask():
    model = tiny_sgmae(emb_layer=0, informed=dict(hint_ratio=0.1)).train()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first = model.encoder.blocks[0](model.encoder._pos_embed(model.encoder.patch_embed(images)))
    model.eval()
    assert torch.allclose(model.patch_features(images), first[:, 1:])  # block 0's output, no final norm
    model.train()
    torch.manual_seed(1)
    random = model(images).mask
    model.sg_informed.fill_(True)
    torch.manual_seed(1)
    informed = model(images).mask
    torch.manual_seed(1)
    assert torch.equal(informed, model.informed_mask(images).mask) and not torch.equal(informed, random)
    with pytest.raises(ValueError, match="emb_layer"):
        SGMAE(**TINY_MAE, emb_layer=5)


def test_hint_schedule_ramps_over_phase_b():
    model = tiny_sgmae(informed=dict(hint_ratio=1.0), hint_ratio_end=0.0)
    assert model.hint_ratio(3, 11) == 1.0  # not switched yet: the configured ratio
    model.sg_switch_epoch.fill_(1)
    assert [model.hint_ratio(e, 12) for e in (1, 6, 11)] == pytest.approx([1.0, 0.5, 0.0])  # epochs 1..11
    features = torch.randn(2, 64, 8)
    out = model.informed_strategy.build(GRID, features=features, hint_ratio=0.25)
    assert (out.hints.sum(1) == 12).all()  # round(0.25 * 48) revealed, not the configured 1.0 (capped at 16)
    assert tiny_sgmae().hint_ratio(5, 10) == 0.1  # no schedule: constant


def attention(rows):
    """[1, 5, 5] map over [CLS, p0, p1, p2, p3] from query rows; the mask is p0, p1, p2 (p3 visible)."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


MASK = torch.tensor([[True, True, True, False]])
HAND = attention(
    [
        [0.2] * 5,
        [0.1, 0.2, 0.3, 0.1, 0.3],  # p0: V = cls + p3 = 0.4, M = 0.6
        [0.0, 0.5, 0.2, 0.2, 0.1],  # p1: V = 0.1, M = 0.9
        [0.3, 0.1, 0.1, 0.1, 0.4],  # p2: V = 0.7, M = 0.3
        [0.9, 0.0, 0.0, 0.0, 0.1],
    ]
)  # p3 is visible: not a query of O


def test_exploitation_rate_matches_the_formulas():
    v, m = exploitation_rates(HAND, MASK, norm="raw")
    assert v.item() == pytest.approx(0.4) and m.item() == pytest.approx(0.6)  # (0.4+0.1+0.7)/3, (0.6+0.9+0.3)/3
    v, m = exploitation_rates(HAND, MASK, norm="per_token")  # key shares: V 2/5, M 3/5
    assert v.item() == pytest.approx(0.4 / 0.4) and m.item() == pytest.approx(0.6 / 0.6)
    v, m = exploitation_rates(HAND, MASK, norm="raw", include_cls=False)  # V = p3 only
    assert v.item() == pytest.approx((0.3 + 0.1 + 0.4) / 3)
    v, m = exploitation_rates(HAND, MASK, norm="per_token", include_cls=False)  # shares: V 1/4, M 3/4
    assert v.item() == pytest.approx((0.8 / 3) * 4) and m.item() == pytest.approx(0.6 * 4 / 3)
    uniform = torch.full((2, 65, 65), 1 / 65)
    mask = masking.build("random", ratio=0.75)(2, GRID, torch.Generator().manual_seed(0))
    v, m = exploitation_rates(uniform, mask, norm="per_token")
    assert v.item() == pytest.approx(1.0) and m.item() == pytest.approx(1.0)
    v, m = exploitation_rates(uniform, mask, norm="raw")
    assert v.item() == pytest.approx(17 / 65) and m.item() == pytest.approx(48 / 65)


def test_layer_aggregations():
    visible = attention([[0.2] * 5] + [[0.5, 0.0, 0.0, 0.0, 0.5]] * 4)  # all mass on V
    masked = attention([[0.2] * 5] + [[0.0, 1 / 3, 1 / 3, 1 / 3, 0.0]] * 4)  # all mass on M
    maps = [visible, masked]
    assert exploit_condition(maps, MASK, agg="per_layer")["holds"]  # the last layer: M wins
    assert not exploit_condition(maps, MASK, agg="per_layer", layer=0)["holds"]
    assert not exploit_condition(maps, MASK, agg="majority")["holds"]  # 1 of 2 layers is no majority
    mean = exploit_condition(maps, MASK, agg="mean")  # per_token: V (2.5 + 0) / 2, M (0 + 5/3) / 2
    assert mean["agg_visible"].item() == pytest.approx(1.25) and not mean["holds"]
    rollout = attention_rollout([torch.eye(5).unsqueeze(0)] * 3)  # identity attention: each token keeps itself
    assert torch.allclose(rollout, torch.eye(5))
    assert exploit_condition([torch.eye(5).unsqueeze(0)], MASK, agg="rollout", norm="raw")["agg_mask"] == 1.0


def test_recorded_attention_is_the_blocks_softmax():
    model = tiny_sgmae().eval()
    attn = model.decoder.blocks[0].attn
    seen = []
    attn.fused_attn = False  # timm's explicit path: its softmax goes through attn_drop, where we read it
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.mean(1)))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), recorded_attention(model.decoder.blocks) as maps:
        model(images, mask=model.draw_mask(2, torch.Generator().manual_seed(0)))
    hook.remove()
    assert len(maps) == 1 and torch.allclose(maps[0], seen[0], atol=1e-6)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 65))


def test_switch_rule_fires_after_k_consecutive_probes():
    conditions = [False, True, False, True, True, True, False]
    assert switch_epoch(conditions, k=2) == 4 and switch_epoch(conditions, k=1) == 1
    assert switch_epoch(conditions, k=3) == 5 and switch_epoch(conditions, k=4) is None
    starts_above = [True, True, False, True, True]
    assert switch_epoch(starts_above, k=2) == 1 and switch_epoch(starts_above, k=2, cross=True) == 4
    crossing = tiny_sgmae(exploit_k=2, exploit_cross=True, fallback_fraction=None)
    assert [crossing.update_switch(e, h) for e, h in enumerate(starts_above)] == [False] * 4 + [True]
    model = tiny_sgmae(exploit_k=2, fallback_fraction=None)
    states = [model.update_switch(epoch, holds, max_epochs=100) for epoch, holds in enumerate(conditions)]
    assert states == [False] * 4 + [True] * 3 and int(model.sg_switch_epoch) == 4  # and stays switched
    again = tiny_sgmae(exploit_k=2, exploit_cross=False, fallback_fraction=None)
    assert not again.update_switch(0, True) and not again.update_switch(0, True)  # epoch 0 probed twice: counts once
    assert again.update_switch(1, True)
    fixed = tiny_sgmae(start_epoch=3)
    assert [fixed.update_switch(e, True) for e in range(5)] == [False, False, False, True, True]
    forced = tiny_sgmae(exploit_k=2)  # never holds: switched at round(0.125 * 16) = 2 all the same
    assert [forced.update_switch(e, False, max_epochs=16) for e in range(4)] == [False, False, True, True]
    restored = tiny_sgmae()
    restored.load_state_dict(model.state_dict())  # the switch state is part of every checkpoint
    assert restored.informed and int(restored.sg_switch_epoch) == 4


# --- end to end ---------------------------------------------------------------------------------------
def epoch_metrics(run_dir):
    """metrics.csv folded into one dict per epoch."""
    out = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["epoch"]:  # learning-rate rows carry no epoch
                out.setdefault(int(row["epoch"]), {}).update({k: float(v) for k, v in row.items() if v})
    return out


@pytest.mark.slow
def test_end_to_end_switch_pictures_resume_and_eval(tmp_path, cli):
    run_dir = tmp_path / "run"
    common = [
        *TINY,
        "model=sgmae",
        "logger=csv",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "model.probe_size=64",
        "probe.knn.enabled=false",
        f"hydra.run.dir={run_dir}",
    ]
    cli("train", *common, "trainer.max_epochs=2", "model.start_epoch=1")
    metrics = epoch_metrics(run_dir)
    assert metrics[0]["sgmae/informed"] == 0.0 and metrics[1]["sgmae/informed"] == 1.0
    assert metrics[1]["sgmae/switch_epoch"] == 1.0 and 0.0 <= metrics[1]["sgmae/fallback_rate"] <= 1.0
    assert "sgmae/fallback_rate" not in metrics[0]  # random masks in phase A
    for e in (0, 1):
        assert metrics[e]["sgmae/exploit_visible_l0"] > 0 and metrics[e]["sgmae/exploit_mask_l0"] > 0
    assert (run_dir / "informed_masks" / "epoch_0001.png").is_file()
    assert (run_dir / "reconstructions" / "epoch_0001.png").is_file()  # beside, not instead of, the panels
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert bool(ckpt["state_dict"]["sg_informed"]) and ckpt["mimzoo"]["method"] == "mimzoo.methods.sgmae.SGMAE"
    # Resume under a rule that cannot fire before epoch 100: the restored state keeps informed masking.
    cli(
        "train",
        *common,
        "trainer.max_epochs=3",
        "model.start_epoch=null",
        "model.fallback_fraction=null",
        "model.exploit_k=100",
        "ckpt_path=last",  # a changed rule on purpose: the resume must be told so
        "resume_allow_changes=[model.start_epoch,model.fallback_fraction,model.exploit_k]",
    )
    metrics = epoch_metrics(run_dir)
    assert metrics[2]["sgmae/informed"] == 1.0 and metrics[2]["sgmae/switch_epoch"] == 1.0
    assert "sgmae/fallback_rate" in metrics[2]
    out = tmp_path / "knn"
    cli(
        "evaluate",
        "protocol=knn",
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        "data=cifar10_mini",
        "data.num_workers=0",
        "logger=csv",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "knn" and 0.0 <= results["top1"] <= 1.0
    import timm

    from mimzoo.checkpoints import export_encoder

    kwargs = export_encoder(run_dir / "checkpoints" / "last.ckpt", tmp_path / "vit.pth")  # an MAE encoder, as for MAE
    timm.create_model(**kwargs).load_state_dict(torch.load(tmp_path / "vit.pth"), strict=True)


@pytest.mark.parametrize(
    "preset,key",
    [
        ("sgmae_cifar", None),
        ("sgmae_hint", "model.informed.hint_ratio"),
        ("sgmae_start_epoch", "model.start_epoch"),
        ("sgmae_emb_layer", "model.emb_layer"),
        ("sgmae_mask_ratio", "mask.ratio"),
    ],
)
def test_presets_compose_into_an_sgmae(preset, key):
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert cfg.model._target_ == "mimzoo.methods.SGMAE" and cfg.model.decoder.dim == 256 and cfg.data.patch_size == 4
    assert cfg.trainer.max_epochs == 200 and cfg.objective == "probe/knn_top1"
    assert (key in cfg.hydra.sweeper.params) if key else not cfg.hydra.sweeper.params


@pytest.mark.slow
def test_ddp_ranks_switch_together_and_stay_identical(tmp_path):
    """Two gloo processes: the rule (raw rates: mask tokens hold most keys, so it fires at once) switches both
    ranks at epoch 0, each builds informed masks from its own shard, and the weights stay identical."""
    from test_ddp import run_two_ranks

    r0, r1 = run_two_ranks(
        tmp_path,
        "mae",
        "model=sgmae",
        "model.exploit_norm=raw",
        "model.exploit_k=1",
        "model.exploit_cross=false",
        "model.fallback_fraction=null",
        "model.probe_size=32",
    )
    assert not torch.equal(r0["labels"], r1["labels"])
    for r in (r0, r1):
        assert bool(r["state"]["sg_informed"]) and int(r["state"]["sg_switch_epoch"]) == 0
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    name = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(r0["initial"][name], r0["state"][name])  # training moved the weights


def test_pictures_go_to_the_run_dir_and_to_image_loggers_beside_the_reconstructions(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mimzoo.callbacks import InformedMaskPanels, ReconstructionPanels
    from mimzoo.data import MIMDataModule

    class ImageLogger(CSVLogger):  # stands in for WandbLogger: anything with log_image gets the pictures
        images = []

        def log_image(self, key, images, step=None, caption=None):
            self.images.append((key, images[0].shape, caption))

    model = tiny_sgmae(start_epoch=1, probe_size=16, panels=dict(num_images=4))
    dm = MIMDataModule(name="fake", image_size=32, batch_size=8, num_workers=0, fake_size=32, num_classes=4)
    recon = ReconstructionPanels(str(tmp_path / "reconstructions"), num_images=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=ImageLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[recon],
    )
    trainer.fit(model, datamodule=dm)
    panels = [c for c in trainer.callbacks if isinstance(c, InformedMaskPanels)]
    assert len(panels) == 1 and recon in trainer.callbacks  # added by configure_callbacks, not in place of recon
    assert panels[0].last_path == tmp_path / "informed_masks" / "epoch_0001.png" and panels[0].last_path.is_file()
    keys = [k for k, _, _ in ImageLogger.images]
    assert keys.count("informed_mask") == 2 and keys.count("reconstruction") == 2
    shape = next(s for k, s, _ in ImageLogger.images if k == "informed_mask")
    # 4 rows (image, object part, mask, reconstruction) of 4 images, as uint8 HWC pixels (what the PNG holds)
    assert shape == (4 * 33 + 1, 4 * 33 + 1, 3)
    assert model.informed and int(model.sg_switch_epoch) == 1
