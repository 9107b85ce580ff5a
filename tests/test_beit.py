"""BEiT stage 2: loss on masked positions only, masked pixels never matter, BEiT's init, shared
relative position bias, layer scale, clear tokenizer errors, strict timm export and a loss that falls.

A fake tokenizer (fixed random conv + argmax) stands in for the dVAE so these tests do not depend on it.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mimzoo.methods import BEiT

ENC = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


class FakeTokenizer(nn.Module):
    """Same interface as ``mimzoo.nn.tokenizer.Tokenizer``: a fixed random conv and argmax."""

    def __init__(self, num_tokens=16, downsample=4):
        super().__init__()
        self.num_tokens, self.downsample = num_tokens, downsample
        self.conv = nn.Conv2d(3, num_tokens, downsample, stride=downsample)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(1))

    def grid_size(self, image_size):
        return image_size[0] // self.downsample, image_size[1] // self.downsample

    @torch.no_grad()
    def tokenize(self, images):
        return self.conv(images).flatten(2).argmax(1)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("tokenizer", FakeTokenizer())
    return BEiT(encoder=dict(ENC), mask={"name": "block", "ratio": 0.4, "exact": False}, **kw).eval()


def images(seed=0, b=4):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed_mask(model, b=4, seed=0):
    return model.draw_mask(b, torch.Generator().manual_seed(seed))


def pixel_mask(mask):
    return mask.view(-1, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(-1, 3, -1, -1)


def test_forward_contract_and_block_masks():
    model = make()
    x = images()
    out = model(x)
    assert out.loss.ndim == 0 and out.mask.shape == (4, 64) and out.mask.dtype == torch.bool
    assert 0 <= out.logs["mim_acc"] <= 1
    assert model.encode(x).shape == (4, 65, 32) and model.features(x).shape == (4, 32)
    mask = fixed_mask(model)
    assert torch.equal(model(x, mask=mask).mask, mask)
    assert model.head.out_features == 16


def test_loss_is_cross_entropy_on_masked_positions_only():
    model = make()
    x, mask = images(), fixed_mask(model)
    out = model(x, mask=mask)
    logits = model.head(model.encode(x, mask)[:, 1:])
    manual = F.cross_entropy(logits[mask], model.tokenizer.tokenize(x)[mask])
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # Replace the final hidden states at visible positions with noise: the loss must not move.
    vis = torch.cat([torch.zeros(4, 1, dtype=torch.bool), ~mask], 1).unsqueeze(-1)
    hook = model.encoder.norm.register_forward_hook(lambda m, i, o: torch.where(vis, torch.randn_like(o) * 9, o))
    noisy = model(x, mask=mask).loss
    hook.remove()
    assert torch.equal(noisy, out.loss)


def test_masked_pixels_never_change_any_output():
    model = make()
    x, mask = images(), fixed_mask(model)
    pix = pixel_mask(mask)
    x2 = torch.where(pix, torch.randn_like(x) * 5, x)
    x2[pix] = x2[pix].clone().index_fill_(0, torch.tensor([0]), float("inf"))  # even a non-finite pixel
    assert torch.equal(model.encode(x, mask), model.encode(x2, mask))
    xv = torch.where(pix, x, x + 1)  # visible pixels change
    assert not torch.allclose(model.encode(x, mask), model.encode(xv, mask))
    xg = x.clone().requires_grad_(True)
    model.encode(xg, mask).sum().backward()
    assert (xg.grad[pix] == 0).all() and (xg.grad[~pix] != 0).any()


def test_beit_init():
    model = make(tokenizer=FakeTokenizer(num_tokens=512))
    enc = model.encoder
    for name, w in [
        ("qkv", enc.blocks[0].attn.qkv.weight),
        ("fc1", enc.blocks[1].mlp.fc1.weight),
        ("head", model.head.weight),
        ("patch", enc.patch_embed.proj.weight),
        ("cls", enc.cls_token),
        ("mask", enc.mask_token),
    ]:
        assert w.abs().max() <= 0.02 + 1e-7, name  # cut at ±1 sigma, not ±2
        assert w.abs().max() > 0.015, name
    for layer, block in enumerate(enc.blocks, start=1):  # proj/fc2 of block l: cut at 0.02 / sqrt(2l)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            bound = 0.02 / math.sqrt(2 * layer)
            assert bound * 0.75 < w.abs().max() <= bound + 1e-7
    # std ratio of fc2 between blocks 1 and 2 is sqrt(2*2)/sqrt(2*1) = sqrt(2)
    ratio = enc.blocks[0].mlp.fc2.weight.std() / enc.blocks[1].mlp.fc2.weight.std()
    assert abs(ratio - math.sqrt(2)) < 0.15
    assert all((b.attn.k_bias == 0).all() and "k_bias" not in dict(b.attn.named_parameters()) for b in enc.blocks)
    assert all(
        torch.equal(b.gamma_1, torch.full((32,), 0.1)) and torch.equal(b.gamma_2, torch.full((32,), 0.1))
        for b in enc.blocks
    )
    assert torch.equal(make(layer_scale_init=1e-5).encoder.blocks[0].gamma_1, torch.full((32,), 1e-5))


def test_shared_relative_position_bias_and_no_decay():
    model = make()
    tables = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables == ["encoder.rel_pos_bias.relative_position_bias_table"]  # one table for all layers
    table = model.encoder.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 8 - 1) ** 2 + 3, 2) and (table == 0).all()
    assert model.encoder.pos_embed is None
    # The shared bias reaches every layer: a non-zero table changes the output.
    x = images()
    before = model.encode(x)
    with torch.no_grad():
        table.normal_()
    assert not torch.allclose(before, model.encode(x))
    nwd = model.no_weight_decay()
    assert {"encoder.mask_token", "encoder.cls_token", "encoder.rel_pos_bias.relative_position_bias_table"} <= nwd
    groups = model.param_groups(0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(table) not in decayed and id(model.encoder.mask_token) not in decayed
    assert id(model.head.weight) in decayed
    abs_model = make(use_abs_pos_emb=True, use_shared_rel_pos_bias=False)
    assert abs_model.encoder.pos_embed.shape == (1, 65, 32) and "encoder.pos_embed" in abs_model.no_weight_decay()
    assert not any("relative_position" in n for n, _ in abs_model.named_parameters())


def test_tokenizer_is_frozen_and_not_saved():
    model = make()
    model.train()
    assert not model.tokenizer.training
    assert not any(k.startswith("tokenizer") for k in model.state_dict())
    assert all(not n.startswith("tokenizer") for n, _ in model.named_parameters())
    assert all(not p.requires_grad for p in model.tokenizer.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match=r"model.tokenizer.ckpt=<dvae ckpt>.*mimzoo-train model=dvae"):
        make(tokenizer=None)
    with pytest.raises(ValueError, match="model.tokenizer.ckpt"):
        make(tokenizer={"kind": "dvae", "ckpt": None})
    with pytest.raises(ValueError, match=r"tokenizer grid \(4, 4\).*patch grid \(8, 8\)"):
        make(tokenizer=FakeTokenizer(downsample=8))
    with pytest.raises(ValueError, match="model.num_tokens=8192 but the tokenizer has 16 codes"):
        make(num_tokens=8192)


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("abs_pos", [False, True])
def test_export_to_plain_timm_beit(per_layer, abs_pos):
    model = make(use_abs_pos_emb=abs_pos, use_shared_rel_pos_bias=not abs_pos)
    with torch.no_grad():  # non-trivial tables and positions, so a wrong copy would show
        for n, p in model.encoder.named_parameters():
            if "relative_position_bias_table" in n or n == "pos_embed":
                p.normal_()
    kwargs, state = model.encoder.export_timm(per_layer_rel_pos_bias=per_layer)
    timm_model = timm.create_model(**kwargs).eval()
    assert type(timm_model) is timm.models.beit.Beit
    timm_model.load_state_dict(state, strict=True)
    x = images()
    assert torch.allclose(timm_model(x), model.features(x), atol=1e-5)
    assert torch.allclose(timm_model.forward_features(x), model.encode(x), atol=1e-5)
    if per_layer and not abs_pos:
        assert timm_model.rel_pos_bias is None and timm_model.blocks[1].attn.relative_position_bias_table is not None


def test_short_training_lowers_the_loss():
    model = make().train()
    x, mask = images(b=8), fixed_mask(model, b=8)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(x, mask=mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Starts at chance (ln 16 = 2.77); masked inputs are all the same token, so it falls slowly.
    assert abs(losses[0] - math.log(16)) < 0.1 and losses[-1] < losses[0] - 0.15, losses


def test_hydra_config_builds_beit(monkeypatch):
    """src/mimzoo/conf/model/beit.yaml: a missing ckpt is a clear error; with one, train.build_model gives BEiT."""

    from hydra import compose, initialize_config_dir
    from omegaconf.errors import MissingMandatoryValue

    from mimzoo.train import CONFIG_DIR, build_model

    overrides = ["model=beit", "model/encoder=test", "data=cifar10_mini", "mask=block", "mask.exact=false"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
        with pytest.raises(MissingMandatoryValue, match="ckpt"):
            build_model(cfg)
        cfg = compose("train", overrides=[*overrides, "model.tokenizer.ckpt=/some/dvae.ckpt"])
    specs = []
    monkeypatch.setattr("mimzoo.methods.beit.load_tokenizer", lambda spec: specs.append(spec) or FakeTokenizer())
    model = build_model(cfg)
    assert isinstance(model, BEiT) and specs == [{"kind": "dvae", "ckpt": "/some/dvae.ckpt"}]
    assert model.grid_size == (8, 8) and model.encoder.blocks[0].gamma_1[0].item() == pytest.approx(0.1)
    assert model.mask_strategy.exact is False and model.hparams.tokenizer["ckpt"] == "/some/dvae.ckpt"
    assert model(images()).loss.isfinite()


def test_lightning_fit_and_checkpoint_leave_the_tokenizer_out(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = make().train()
    tok_before = {k: v.clone() for k, v in model.tokenizer.state_dict().items()}
    data = DataLoader(TensorDataset(images(b=16), torch.zeros(16, dtype=torch.long)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    ckpt_path = tmp_path / "beit.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["mimzoo"]["method"] == "mimzoo.methods.beit.BEiT"
    assert not any("tokenizer" in k for k in ckpt["state_dict"]) and "tokenizer" not in ckpt["hyper_parameters"]
    assert "encoder.mask_token" in ckpt["state_dict"]
    assert all(torch.equal(v, tok_before[k]) for k, v in model.tokenizer.state_dict().items())
    assert not model.tokenizer.training


def test_finetune_builds_a_timm_beit_from_the_export():
    from mimzoo.eval.finetune import FineTune

    model = make()
    ft = FineTune.from_pretrained(model, num_classes=10, drop_path_rate=0.1, mixup=0, cutmix=0)
    assert type(ft.model).__name__ == "Beit" and ft(images()).shape == (4, 10)
    _, exported = model.export_timm()
    name = "blocks.1.attn.qkv.weight"
    assert torch.equal(ft.model.state_dict()[name], exported[name])


def test_per_block_tables_and_mean_pooling_are_timms():
    """``use_rel_pos_bias`` (a table per block) and ``global_pool="avg"`` (fc_norm after a mean over patch
    tokens): the features are the exported timm Beit's; a shared table next to per-block ones is folded
    into them on export."""
    from mimzoo.nn import BEiTEncoder

    torch.manual_seed(0)
    enc = BEiTEncoder(**ENC, use_shared_rel_pos_bias=True, use_rel_pos_bias=True, global_pool="avg").eval()
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "relative_position_bias_table" in n or n.startswith("fc_norm"):
                p.normal_()
    assert isinstance(enc.norm, nn.Identity) and enc.blocks[1].attn.relative_position_bias_table is not None
    x = images()
    tokens = enc.forward_masked(x)
    assert torch.allclose(enc.features(x), enc.fc_norm(tokens[:, 1:].mean(1)), atol=1e-6)
    for per_layer in (True, False):
        kwargs, state = enc.export_timm(per_layer_rel_pos_bias=per_layer)
        vit = timm.create_model(**kwargs).eval()
        vit.load_state_dict(state, strict=True)
        assert (vit.rel_pos_bias is None) == per_layer
        assert torch.allclose(vit(x), enc.features(x), atol=1e-5)
    with pytest.raises(ValueError, match="global_pool='max'"):
        BEiTEncoder(**ENC, global_pool="max")


def test_encoder_only_beit_needs_num_tokens_and_refuses_the_loss():
    model = BEiT(encoder=dict(ENC), tokenizer=None, num_tokens=32).eval()
    assert model.tokenizer is None and model.head.out_features == 32
    assert model.features(images()).shape == (4, 32)
    with pytest.raises(ValueError, match=r"no tokenizer \(built for its encoder.*tokenizer.kind=dvae"):
        model(images())
