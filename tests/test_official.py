"""Official MAE checkpoints in: our module computes what facebookresearch/mae computes on the same
weights, images and mask (checked against tests/reference_mae.py, an independent functional MAE);
import -> load_pretrained -> export to timm round-trips; wrong files fail loudly. Also the sin-cos
table and patch order against facebookresearch/mae (``util/pos_embed.py``, ``models_mae.py``)."""

import argparse
import json
import math
from importlib.metadata import entry_points

import pytest
import timm
import torch

import mimzoo
import reference_mae as ref
from mimzoo.checkpoints import export_main, import_main, load_official, load_pretrained
from mimzoo.nn import ViTEncoder, patchify, sincos_pos_embed_2d, unpatchify

D, DEPTH, DEC_D, DEC_DEPTH, P, IMG, C = 32, 2, 32, 1, 4, 32, 3
L = (IMG // P) ** 2
HEADS = dict(encoder={"num_heads": 2}, decoder={"num_heads": 2})


def official_state_dict(decoder=True, seed=0, dim=D, depth=DEPTH):
    """Random official-format MAE weights; positions random too, to prove they are used as given.
    The decoder's MLP ratio (2) differs from the encoder's (4), to prove both are inferred."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def block(name, d, hidden):
        sd.update(
            {
                f"{name}.norm1.weight": 1 + r(d),
                f"{name}.norm1.bias": r(d),
                f"{name}.attn.qkv.weight": r(3 * d, d),
                f"{name}.attn.qkv.bias": r(3 * d),
                f"{name}.attn.proj.weight": r(d, d),
                f"{name}.attn.proj.bias": r(d),
                f"{name}.norm2.weight": 1 + r(d),
                f"{name}.norm2.bias": r(d),
                f"{name}.mlp.fc1.weight": r(hidden, d),
                f"{name}.mlp.fc1.bias": r(hidden),
                f"{name}.mlp.fc2.weight": r(d, hidden),
                f"{name}.mlp.fc2.bias": r(d),
            }
        )

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, L + 1, dim, s=0.5),
        "patch_embed.proj.weight": r(dim, C, P, P),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        block(f"blocks.{i}", dim, 4 * dim)
    sd.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim)})
    if decoder:
        sd.update(
            {
                "decoder_embed.weight": r(DEC_D, dim),
                "decoder_embed.bias": r(DEC_D),
                "mask_token": r(1, 1, DEC_D),
                "decoder_pos_embed": r(1, L + 1, DEC_D, s=0.5),
            }
        )
        for i in range(DEC_DEPTH):
            block(f"decoder_blocks.{i}", DEC_D, 2 * DEC_D)
        sd.update(
            {
                "decoder_norm.weight": 1 + r(DEC_D),
                "decoder_norm.bias": r(DEC_D),
                "decoder_pred.weight": r(P * P * C, DEC_D),
                "decoder_pred.bias": r(P * P * C),
            }
        )
    return sd


def save(tmp_path, obj, name="official.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def images(b=4, seed=1):
    return torch.randn(b, C, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def noise(b=4, seed=2):
    return torch.rand(b, L, generator=torch.Generator().manual_seed(seed))


# --- (a) same loss and prediction as the official forward --------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_and_pred_equal_official_reference(tmp_path, norm_pix_loss):
    sd = official_state_dict()
    model = mimzoo.load_official("mae", save(tmp_path, {"model": sd}), **HEADS, norm_pix_loss=norm_pix_loss)
    assert model.hparams.encoder == dict(
        img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=2, mlp_ratio=4.0, in_chans=C
    )
    assert model.hparams.decoder == dict(dim=DEC_D, depth=DEC_DEPTH, num_heads=2, mlp_ratio=2.0)
    x, n = images(), noise()
    ref_loss, ref_pred, ref_mask = ref.forward(sd, x, n, 2, 2, norm_pix_loss)
    assert ref_mask.sum(1).eq(L - int(L * 0.25)).all()
    with torch.no_grad():
        out = model(x, mask=ref_mask.bool())
    assert torch.equal(out.mask, ref_mask.bool())
    torch.testing.assert_close(out.pred, ref_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    # The comparison has teeth: other heads give another prediction, the other target another loss.
    assert (ref.forward(sd, x, n, 4, 2, norm_pix_loss)[1] - ref_pred).abs().max() > 1e-2
    assert (ref.forward(sd, x, n, 2, 2, not norm_pix_loss)[0] - ref_loss).abs() > 1e-3


def test_norm_pix_loss_from_official_args_unless_overridden(tmp_path):
    sd = official_state_dict()
    args = argparse.Namespace(norm_pix_loss=False, mask_ratio=0.75, input_size=IMG, data_path="/imagenet")
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([w], betas=(0.9, 0.95))
    w.sum().backward(), opt.step()
    # a main_pretrain.py training checkpoint: everything in it must pass torch.load(weights_only=True)
    path = save(
        tmp_path, {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "scaler": {"scale": 65536.0}, "args": args}
    )
    assert load_official("mae", path, **HEADS).norm_pix_loss is False
    assert load_official("mae", path, **HEADS, norm_pix_loss=True).norm_pix_loss is True
    bare = save(tmp_path, sd, "bare.pth")  # a bare state dict: MAE's recommended default
    assert load_official("mae", bare, **HEADS).norm_pix_loss is True


@pytest.mark.parametrize("dim,heads", [(192, 3), (384, 6), (128, 2)])
def test_encoder_heads_default_from_width(tmp_path, dim, heads):
    sd = official_state_dict(decoder=False, dim=dim, depth=1)
    with pytest.warns(UserWarning):
        model = load_official("mae", save(tmp_path, sd), decoder={"dim": 32, "depth": 1, "num_heads": 2})
    assert model.hparams.encoder["num_heads"] == heads == model.encoder.blocks[0].attn.num_heads


# --- (b) encoder-only releases ----------------------------------------------------------------
def test_encoder_only_checkpoint_loads_with_fresh_decoder(tmp_path):
    sd = official_state_dict(decoder=False)
    path = save(tmp_path, {"model": sd})
    with pytest.warns(UserWarning, match="no decoder weights"):
        model = load_official("mae", path, encoder={"num_heads": 2})
    dec = model.hparams.decoder
    assert dec == dict(dim=512, depth=8, num_heads=16, mlp_ratio=4.0) and len(model.decoder.blocks) == 8
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), ref.encoder(sd, x, 2)[0], rtol=1e-5, atol=1e-5)
        # With a mask: the same visible tokens (ours in grid order, the official in noise order).
        latent, mask, _, ids_keep = ref.encoder(sd, x, 2, noise())
        ours = model.encode(x, mask.bool())
        order = torch.argsort(ids_keep, dim=1).unsqueeze(-1).expand(-1, -1, D)
        torch.testing.assert_close(ours[:, 1:], torch.gather(latent[:, 1:], 1, order), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[:, 0], latent[:, 0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(model(x).loss)


# --- (c) mimzoo-import -> load_pretrained -> mimzoo-export -> timm ------------------------------
def test_cli_import_then_export_to_timm(tmp_path, capsys):
    sd = official_state_dict()
    src, out, vit_path = save(tmp_path, {"model": sd}), tmp_path / "ckpts" / "mae.ckpt", tmp_path / "vit.pth"
    import_main(["mae", str(src), str(out), "norm_pix_loss=false", "encoder.num_heads=2", "decoder.num_heads=2"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["mae.ckpt"]  # no temp file left behind
    raw = torch.load(out, weights_only=False)
    assert raw["mimzoo"]["method"] == "mimzoo.methods.mae.MAE"
    model = load_pretrained(out).eval()
    assert model.norm_pix_loss is False and model.hparams.decoder["num_heads"] == 2
    direct = load_official("mae", src, **HEADS, norm_pix_loss=False)
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.state_dict().items())

    export_main([str(out), str(vit_path)])
    kwargs = json.loads(vit_path.with_name("vit.pth.json").read_text())
    vit = timm.create_model(**kwargs).eval()
    vit.load_state_dict(torch.load(vit_path), strict=True)
    x = images()
    with torch.no_grad():
        feats = vit.forward_features(x)
        torch.testing.assert_close(feats, model.encode(x))
        torch.testing.assert_close(feats, ref.encoder(sd, x, 2)[0], rtol=1e-5, atol=1e-5)
    assert "mimzoo-import" in {
        e.name for e in entry_points(group="console_scripts") if e.value == "mimzoo.checkpoints:import_main"
    }


# --- (d) wrong files fail with a message that names the problem ---------------------------------
def test_timm_classifier_is_rejected_naming_its_head(tmp_path, capsys):
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=P,
        embed_dim=D,
        depth=1,
        num_heads=2,
        num_classes=10,
    )
    with pytest.raises(ValueError, match=r"unexpected keys \(2\): head.bias, head.weight(.|\n)*Fine-tuned"):
        load_official("mae", save(tmp_path, vit.state_dict()), **HEADS)
    with pytest.raises(SystemExit) as exit_info:  # the CLI says the same, on one line, without a traceback
        import_main(["mae", str(tmp_path / "official.pth"), str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mimzoo-import: error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "head.weight" in errors[0] and "Traceback" not in err
    assert str(exit_info.value) == errors[0]  # one line, and the exception says what the user saw
    assert not (tmp_path / "out.ckpt").exists()


def test_beit_like_checkpoints_are_rejected(tmp_path):
    sd = official_state_dict(decoder=False)
    beit = {k: v for k, v in sd.items() if k != "pos_embed"}  # BEiT: relative positions, no pos_embed
    beit.update(
        {
            "mask_token": torch.zeros(1, 1, D),
            "blocks.0.gamma_1": torch.ones(D),
            "blocks.0.attn.relative_position_bias_table": torch.zeros(10, 2),
            "lm_head.weight": torch.zeros(8, D),
        }
    )
    with pytest.raises(ValueError, match=r"missing \['pos_embed'\]; unknown keys \['lm_head.weight'\]"):
        load_official("mae", save(tmp_path, {"model": beit}), **HEADS)
    beit["pos_embed"] = sd["pos_embed"]  # BEiT with absolute positions gets further, then names the rest
    with pytest.raises(
        ValueError,
        match=r"blocks.0.attn.relative_position_bias_table, blocks.0.gamma_1(.|\n)*"
        r"missing keys \(103\): decoder_blocks.0",
    ):
        load_official("mae", save(tmp_path, {"model": beit}), **HEADS)


def test_other_mistakes_are_named(tmp_path):
    sd = official_state_dict()
    path = save(tmp_path, {"model": sd})
    with pytest.raises(ValueError, match=r"shape mismatches \(31\): blocks.0.attn.proj.bias \(32,\) vs ours \(64,\)"):
        load_official("mae", path, decoder={"num_heads": 2}, encoder={"embed_dim": 64, "num_heads": 2})
    partial = {k: v for k, v in sd.items() if k != "decoder_pred.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder_pred.weight"):
        load_official("mae", save(tmp_path, {"model": partial}, "partial.pth"), **HEADS)
    with pytest.raises(KeyError, match=r"known: (.*, )?mae\b"):
        load_official("dino", path)
    with pytest.raises(FileNotFoundError):
        load_official("mae", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_official("mae", save(tmp_path, {"model": {"epoch": 1}}, "junk.pth"))
    mimzoo_ckpt = tmp_path / "m.ckpt"
    import_main(["mae", str(path), str(mimzoo_ckpt), "encoder.num_heads=2", "decoder.num_heads=2"])
    with pytest.raises(ValueError, match="already a mimzoo checkpoint"):
        load_official("mae", mimzoo_ckpt)


# --- (e) the sin-cos table, against facebookresearch/mae util/pos_embed.py ---------------------
def test_sincos_table_matches_spec():
    dim, (h, w) = 8, (3, 4)  # non-square, so rows and columns cannot be confused
    t = sincos_pos_embed_2d(dim, (h, w), cls_token=True)[0]
    assert t.shape == (1 + h * w, dim) and torch.equal(t[0], torch.zeros(dim))
    grid = t[1:].reshape(h, w, dim)  # row-major: token n = row * w + col
    assert torch.equal(grid[:, :, : dim // 2], grid[:1, :, : dim // 2].expand(h, -1, -1))  # column only
    assert torch.equal(grid[:, :, dim // 2 :], grid[:, :1, dim // 2 :].expand(-1, w, -1))  # row only
    assert not torch.equal(grid[0, 0], grid[0, 1]) and not torch.equal(grid[0, 0], grid[1, 0])

    # By hand, width 4 per half: omega = (1, 1/100); code(t) = [sin t, sin t/100, cos t, cos t/100].
    def code(t):
        return [math.sin(t), math.sin(t / 100), math.cos(t), math.cos(t / 100)]

    for row, col in [(2, 3), (1, 0)]:
        expected = torch.tensor(code(col) + code(row))
        torch.testing.assert_close(t[1 + row * w + col], expected)
    torch.testing.assert_close(t[1 + 2 * w + 3, 0], torch.tensor(math.sin(3.0)))
    enc = ViTEncoder(img_size=IMG, patch_size=P, embed_dim=D, depth=1, num_heads=2)
    assert torch.equal(enc.pos_embed, sincos_pos_embed_2d(D, (IMG // P, IMG // P)))  # MAE's frozen table
    assert not enc.pos_embed.requires_grad


# --- (f) patch order --------------------------------------------------------------------------
def test_patchify_order_and_inverse():
    b, p, (h, w) = 2, 4, (8, 12)  # a 2x3 grid
    x = torch.randn(b, C, h, w)
    patches = patchify(x, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * C)
    for n, i in [(0, 0), (4, 17), (5, p * p * C - 1), (2, 30)]:
        row, col = divmod(n, w // p)  # tokens row-major
        (py, px), c = divmod(i // C, p), i % C  # inside: (pixel row, pixel col, channel), channel fastest
        assert patches[1, n, i] == x[1, c, row * p + py, col * p + px]
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), C), x)
    y = torch.randn_like(patches)
    assert torch.equal(patchify(unpatchify(y, p, (h // p, w // p), C), p), y)
    assert torch.equal(ref.patchify(x, p), patches)
