"""Official BEiT checkpoints in: a microsoft/unilm pre-training checkpoint, written as ``utils.save_model``
writes it, gives the official MIM logits, loss and accuracy (tests/reference_beit.py, restated from
``modeling_pretrain.py``/``modeling_finetune.py``/``engine_for_pretraining.py``) on the same images, mask
and codes; timm's BEiT release weights (the fine-tuning backbone) give timm's own features; wrong files
fail with one line naming the importer to use."""

import argparse
import re

import pytest
import timm
import torch
from torch import nn

import reference_beit as ref
from mimzoo.checkpoints import import_main, load_official, load_pretrained
from mimzoo.checkpoints.convert import beit_encoder_sizes
from mimzoo.methods import BEiT

IMG, P, D, DEPTH, HEADS, VOCAB = 32, 4, 32, 2, 2, 16
GRID = IMG // P
N = GRID * GRID


class FakeTokenizer(nn.Module):
    """The ``mimzoo.nn.tokenizer.Tokenizer`` interface: a fixed random conv and argmax."""

    def __init__(self, num_tokens=VOCAB, downsample=P):
        super().__init__()
        self.num_tokens, self.downsample = num_tokens, downsample
        self.conv = nn.Conv2d(3, num_tokens, downsample, stride=downsample)
        nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(1))
        nn.init.normal_(self.conv.bias, generator=torch.Generator().manual_seed(2))  # the same codes every run

    def grid_size(self, image_size):
        return image_size[0] // self.downsample, image_size[1] // self.downsample

    @torch.no_grad()
    def tokenize(self, images):
        return self.conv(images).flatten(2).argmax(1)


VARIANTS = {  # run_beit_pretraining.py flags -> VisionTransformerForMaskedImageModeling arguments
    "default": dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1),
    # beit_base_patch16_224_pt1k_800ep: --disable_rel_pos_bias --abs_pos_emb --layer_scale_init_value 0
    "abs_pos_only": dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True, init_values=0.0),
    # the model's own use_rel_pos_bias (run_beit_pretraining.py never sets it; fine-tuned BEiTs use it)
    "per_block_tables": dict(
        use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=1e-5
    ),
}


def official_sd(variant="default", seed=0, vocab=VOCAB, **kw):
    return ref.official_state_dict(
        img_size=IMG,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        vocab_size=vocab,
        seed=seed,
        **{**VARIANTS[variant], **kw},
    )


def save_model(tmp_path, sd, args=None, name="checkpoint-99.pth"):
    """What ``utils.save_model`` writes (the loss-scaler branch): model, optimizer, epoch, scaler, args."""
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.05, "lr_scale": 1.0}], lr=1.5e-3, betas=(0.9, 0.999))
    w.sum().backward(), opt.step()
    path = tmp_path / name
    torch.save(
        {
            "model": sd,
            "optimizer": opt.state_dict(),
            "epoch": 99,
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 7,
            },
            "args": args or ref.official_args(input_size=IMG, window_size=(GRID, GRID), patch_size=(P, P)),
        },
        path,
    )
    return path


def images(b=4, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def masks(b=4, seed=2):
    """A mask per image with a different masked count each (BEiT's block masks vary), never empty."""
    m = torch.rand(b, N, generator=torch.Generator().manual_seed(seed)) < torch.linspace(0.2, 0.6, b)[:, None]
    m[:, 0] = True
    return m


def ours(model, x, mask):
    """Our MIM logits on the masked positions (the head on the encoder's masked tokens), loss and accuracy."""
    with torch.no_grad():
        out = model(x, mask=mask)
        logits = model.head(model.encode(x, mask)[:, 1:][mask])
    return logits, out.loss, out.logs["mim_acc"]


# --- (a) the official logits, loss and accuracy ------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pretraining_checkpoint_gives_the_official_logits_and_loss(tmp_path, variant):
    sd = official_sd(variant)
    assert list(sd) == ref.official_keys(DEPTH, **VARIANTS[variant])
    args = ref.official_args(
        input_size=IMG,
        window_size=(GRID, GRID),
        patch_size=(P, P),
        layer_scale_init_value=VARIANTS[variant]["init_values"],
        abs_pos_emb=VARIANTS[variant]["use_abs_pos_emb"],
        rel_pos_bias=VARIANTS[variant]["use_shared_rel_pos_bias"],
    )
    tok = FakeTokenizer()
    heads = {} if variant != "abs_pos_only" else {"encoder": {"num_heads": HEADS}}  # no table tells it
    model = load_official("beit", save_model(tmp_path, sd, args), tokenizer=tok, **heads)
    h = model.hparams
    assert h.encoder["num_heads"] == HEADS and h.encoder["img_size"] == IMG and h.encoder["depth"] == DEPTH
    assert h.use_abs_pos_emb == VARIANTS[variant]["use_abs_pos_emb"]
    assert h.layer_scale_init == (VARIANTS[variant]["init_values"] or None)
    assert h.use_shared_rel_pos_bias == VARIANTS[variant]["use_shared_rel_pos_bias"]
    assert h.encoder.get("use_rel_pos_bias", False) == VARIANTS[variant].get("use_rel_pos_bias", False)
    x, mask = images(), masks()
    codes = tok.tokenize(x)
    ref_loss, ref_logits, ref_acc = ref.pretraining_loss(sd, x, mask, codes, num_heads=HEADS)
    logits, loss, acc = ours(model, x, mask)
    print(
        f"{variant}: loss {ref_loss.item():.4f} (other mask: "
        f"{ref.pretraining_loss(sd, x, masks(seed=9), codes, num_heads=HEADS)[0].item():.4f}), "
        f"max |logits| {ref_logits.abs().max().item():.1f}, "
        f"max |logits - official| = {(logits - ref_logits).abs().max().item():.2e}, "
        f"|loss - official| = {(loss - ref_loss).abs().item():.2e}"
    )
    # float32: timm's attention (scaled_dot_product_attention) and the official explicit softmax round
    # differently (0 with a relative bias, ~2e-6 on logits of ~3 without); in float64 they are one formula
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=5e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert acc == ref_acc
    sd64, x64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, x.double()
    model.double()
    with torch.no_grad():
        logits64 = model.head(model.encode(x64, mask)[:, 1:][mask])
    torch.testing.assert_close(logits64, ref.forward(sd64, x64, mask, num_heads=HEADS), rtol=1e-12, atol=1e-12)
    # teeth: the mask, the codes (and, where no table fixes them, the heads) change the official numbers
    assert (ref.pretraining_loss(sd, x, masks(seed=9), codes, num_heads=HEADS)[0] - ref_loss).abs() > 1e-3
    if variant == "abs_pos_only":
        assert (ref.forward(sd, x, mask, num_heads=2 * HEADS) - ref_logits).abs().max() > 1e-3
        assert load_official("beit", tmp_path / "checkpoint-99.pth").hparams.encoder["num_heads"] == 1  # 32 // 64
    assert (ref.pretraining_loss(sd, x, mask, codes.roll(1, 1), num_heads=HEADS)[0] - ref_loss).abs() > 1e-3


def test_relative_bias_tables_and_their_class_rows_are_used(tmp_path):
    """The shared table's token rows and its three class rows (cls -> token, token -> cls, cls -> cls) each
    move the official logits, and ours with them: a swapped or ignored part of the table would show."""
    sd = official_sd()
    x, mask = images(), masks()
    base = ref.forward(sd, x, mask, num_heads=HEADS)
    table = "rel_pos_bias.relative_position_bias_table"
    for i, rows in enumerate((slice(None, -3), slice(-3, -2), slice(-2, -1), slice(-1, None))):
        changed = dict(sd)
        changed[table] = sd[table].clone()
        changed[table][rows] += torch.randn(changed[table][rows].shape, generator=torch.Generator().manual_seed(i))
        expected = ref.forward(changed, x, mask, num_heads=HEADS)
        assert (expected - base).abs().max() > 1e-4  # cls -> cls moves one logit entry: a small effect
        model = load_official("beit", save_model(tmp_path, changed))
        with torch.no_grad():
            torch.testing.assert_close(model.head(model.encode(x, mask)[:, 1:][mask]), expected, rtol=1e-6, atol=5e-6)


def test_official_index_is_timms():
    """The importer checks each persistent ``relative_position_index`` against timm's and drops it: the two
    constructions agree, on a non-square window too (rows and columns cannot be confused)."""
    from timm.models.beit import gen_relative_position_index

    for window in ((GRID, GRID), (3, 5)):
        assert torch.equal(ref.relative_position_index(window), gen_relative_position_index(window))


def test_sizes_are_inferred_from_whatever_tells_them():
    sd = official_sd()
    sizes = beit_encoder_sizes(sd, "f.pth")
    assert sizes == dict(
        img_size=IMG,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=4.0,
        in_chans=3,
        layer_scale_init=0.1,
        use_abs_pos_emb=False,
        use_shared_rel_pos_bias=True,
        use_rel_pos_bias=False,
        global_pool="token",
    )
    no_index = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}  # the table alone
    assert beit_encoder_sizes(no_index, "f.pth")["img_size"] == IMG
    nothing = {k: v for k, v in no_index.items() if "relative_position" not in k}  # no position tensor at all
    with pytest.raises(ValueError, match=r"encoder.img_size=224"):
        beit_encoder_sizes(nothing, "f.pth")
    assert beit_encoder_sizes(nothing, "f.pth", img_size=64)["img_size"] == 64
    bad = dict(sd, pos_embed=torch.zeros(1, 1 + 4 * 4, D))  # a 4x4 pos_embed next to an 8x8 table
    with pytest.raises(ValueError, match=r"disagree on the patch grid \(pos_embed: 4x4, .*8x8"):
        beit_encoder_sizes(bad, "f.pth")


# --- (b) mimzoo-import beit -> load_pretrained, with a dVAE tokenizer spec ---------------------------
def tiny_dvae_checkpoint(tmp_path):
    from mimzoo.methods.dvae import DVAE

    torch.manual_seed(0)
    dvae = DVAE(vae=dict(num_tokens=VOCAB, downsample=P, hidden_dim=16, code_dim=16, num_resblocks=0), image_size=IMG)
    ckpt = {"state_dict": dvae.state_dict(), "hyper_parameters": dict(dvae.hparams)}
    dvae.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "dvae.ckpt")
    return tmp_path / "dvae.ckpt"


def test_cli_import_with_a_tokenizer_spec_then_load_pretrained(tmp_path, capsys):
    from mimzoo.methods.beit import load_tokenizer

    sd = official_sd()
    src, out, dvae = save_model(tmp_path, sd), tmp_path / "ckpts" / "beit.ckpt", tiny_dvae_checkpoint(tmp_path)
    import_main(["beit", str(src), str(out), "tokenizer.kind=dvae", f"tokenizer.ckpt={dvae}"])
    assert "wrote" in capsys.readouterr().out
    raw = torch.load(out, weights_only=False)
    assert raw["mimzoo"]["method"] == "mimzoo.methods.beit.BEiT"
    assert raw["hyper_parameters"]["tokenizer"] == {"kind": "dvae", "ckpt": str(dvae)}
    model = load_pretrained(out).eval()
    x, mask = images(), masks()
    codes = load_tokenizer({"kind": "dvae", "ckpt": str(dvae)}).tokenize(x)
    ref_loss, ref_logits, _ = ref.pretraining_loss(sd, x, mask, codes, num_heads=HEADS)
    logits, loss, _ = ours(model, x, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)


def test_without_a_tokenizer_the_module_is_encoder_only(tmp_path):
    sd = official_sd()
    model = load_official("beit", save_model(tmp_path, sd))
    assert model.tokenizer is None and model.hparams.num_tokens == VOCAB
    x, mask = images(), masks()
    with torch.no_grad():
        logits = model.head(model.encode(x, mask)[:, 1:][mask])
        torch.testing.assert_close(logits, ref.forward(sd, x, mask, num_heads=HEADS), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            model.features(x),
            ref.forward_features(sd, x, torch.zeros(4, N, dtype=torch.bool), num_heads=HEADS)[:, 0],
            rtol=1e-6,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match=r"no tokenizer .*tokenizer.kind=dvae"):
        model(x, mask=mask)
    out = tmp_path / "enc.ckpt"
    import_main(["beit", str(tmp_path / "checkpoint-99.pth"), str(out)])
    assert torch.equal(load_pretrained(out).features(x), model.features(x))


def test_dalle_tokenizer_spec_problems_are_one_line(tmp_path, capsys):
    """``tokenizer.kind=dalle``: without OpenAI's package or without encoder.pkl the CLI says which."""
    src = save_model(tmp_path, official_sd())
    with pytest.raises(SystemExit) as err:
        import_main(
            [
                "beit",
                str(src),
                str(tmp_path / "out.ckpt"),
                "tokenizer.kind=dalle",
                f"tokenizer.path={tmp_path / 'nowhere'}",
            ]
        )
    text = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "\n" not in text and text.startswith("mimzoo-import: error: ")
    assert re.search(r"pip install DALL-E|no DALL-E encoder at .*encoder.pkl", text), text


def test_tokenizer_must_match_the_lm_head(tmp_path):
    path = save_model(tmp_path, official_sd())
    with pytest.raises(
        ValueError,
        match=r"lm_head predicts 16 codes but the tokenizer has 8; "
        r".*discrete_vae_type=dall-e",
    ):
        load_official("beit", path, tokenizer=FakeTokenizer(num_tokens=8))
    with pytest.raises(ValueError, match=r"tokenizer grid \(4, 4\)"):
        load_official("beit", path, tokenizer=FakeTokenizer(downsample=8))


# --- (c) timm's BEiT release weights: the fine-tuning backbone ----------------------------------------
def timm_beit(seed=0, num_classes=10):
    """A random ``beit_base_patch16_224``-architecture model at our tiny size: per-block tables, layer
    scale, mean pooling with ``fc_norm``, a classifier head; tables and gammas made non-trivial."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "beit_base_patch16_224",
        pretrained=False,
        img_size=IMG,
        patch_size=P,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=num_classes,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "gamma_1", "gamma_2", "q_bias", "v_bias")):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("layout", ["timm", "unilm_finetuned"])
def test_timm_release_weights_give_timms_features(tmp_path, layout):
    vit = timm_beit()
    sd = vit.state_dict()
    assert "blocks.0.attn.relative_position_bias_table" in sd and "fc_norm.weight" in sd and "norm.weight" not in sd
    if layout == "unilm_finetuned":  # BEiT's own fine-tuned VisionTransformer: persistent indexes, under 'model'
        for i in range(DEPTH):
            sd[f"blocks.{i}.attn.relative_position_index"] = ref.relative_position_index((GRID, GRID))
        sd = {"model": sd}
    torch.save(sd, tmp_path / "beit.pth")
    model = load_official("beit", tmp_path / "beit.pth")
    enc = model.encoder
    assert model.hparams.encoder["use_rel_pos_bias"] and model.hparams.encoder["global_pool"] == "avg"
    assert enc.rel_pos_bias is None and model.tokenizer is None
    x = images()
    with torch.no_grad():
        timm_tokens = vit.forward_features(x)
        timm_feats = vit.forward_head(timm_tokens, pre_logits=True)
        print(f"{layout}: max |features - timm| = {(model.features(x) - timm_feats).abs().max().item():.2e}")
        torch.testing.assert_close(model.encode(x), timm_tokens, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.features(x), timm_feats, rtol=1e-6, atol=1e-6)
        # export (mimzoo-export, fine-tuning) gives timm's model back
        kwargs, state = model.export_timm()
        again = timm.create_model(**kwargs).eval()
        again.load_state_dict(state, strict=True)
        torch.testing.assert_close(again(x), timm_feats, rtol=1e-6, atol=1e-6)
        # teeth: the per-block tables and mean pooling matter
        assert (vit.forward_features(x)[:, 0] - timm_feats).abs().max() > 1e-3
        vit.blocks[1].attn.relative_position_bias_table.normal_()  # (a constant would cancel in the softmax)
        assert (vit.forward_head(vit.forward_features(x), pre_logits=True) - timm_feats).abs().max() > 1e-4


def test_timm_weights_through_the_cli_serve_mimzoo_eval(tmp_path):
    from mimzoo.eval.finetune import FineTune
    from mimzoo.eval.linear import LinearProbe

    vit = timm_beit(seed=3)
    torch.save(vit.state_dict(), tmp_path / "beit.pth")
    out = tmp_path / "beit.ckpt"
    import_main(["beit", str(tmp_path / "beit.pth"), str(out)])
    model = load_pretrained(out).eval()  # what mimzoo-eval loads
    x = images()
    with torch.no_grad():
        timm_feats = vit.forward_head(vit.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.features(x), timm_feats, rtol=1e-6, atol=1e-6)  # kNN
        probe = LinearProbe(model, num_classes=10)
        assert probe(x).shape == (4, 10)
    ft = FineTune.from_pretrained(model, num_classes=10, mixup=0, cutmix=0)
    ft.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ft.model.forward_head(ft.model.forward_features(x), pre_logits=True), timm_feats, rtol=1e-6, atol=1e-6
        )


def test_timm_weights_with_a_tokenizer_continue_pretraining(tmp_path):
    torch.save(timm_beit().state_dict(), tmp_path / "beit.pth")
    with pytest.warns(UserWarning, match=r"no mask_token, lm_head.weight, lm_head.bias \(its 10-class classifier"):
        model = load_official("beit", tmp_path / "beit.pth", tokenizer=FakeTokenizer())
    assert model.head.out_features == VOCAB and torch.isfinite(model(images(), mask=masks()).loss)


# --- (d) wrong files: one line naming the fix --------------------------------------------------------
def mae_checkpoint():
    from conftest import TINY_MAE
    from mimzoo.checkpoints.mae import _official_name
    from mimzoo.methods import MAE

    model = MAE(**TINY_MAE)
    return {_official_name(k): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "kind,message",
    [
        ("mae", r"is a MAE checkpoint \(decoder_\* keys\): use `mimzoo-import mae "),
        ("mae_encoder", r"is a plain ViT \(attn.qkv.bias.*use `mimzoo-import mae` or `mimzoo-import ibot`"),
        ("ibot", r"is an iBOT/DINO training checkpoint .*use `mimzoo-import ibot "),
        ("simmim", r"is a SimMIM checkpoint .*use `mimzoo-import simmim "),
        ("noise", r"is not a checkpoint torch.load can read safely \(.*\); pass the .pth file"),
        ("not_a_model", r"expected a state dict"),
    ],
)
def test_wrong_files_fail_with_one_line_naming_the_fix(tmp_path, kind, message):
    path = tmp_path / "file.pth"
    if kind == "noise":
        path.write_bytes(
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes()
        )
    else:
        sd = mae_checkpoint()
        obj = {
            "mae": {"model": sd},
            "not_a_model": {"model": {"epoch": 3}},
            "mae_encoder": {"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}},
            "ibot": {"teacher": {}, "student": {}, "epoch": 1},
            "simmim": {
                "model": {
                    "encoder.patch_embed.proj.weight": torch.zeros(D, 3, P, P),
                    "decoder.0.weight": torch.zeros(48, D, 1, 1),
                }
            },
        }[kind]
        torch.save(obj, path)
    with pytest.raises(SystemExit) as err:
        import_main(["beit", str(path), str(tmp_path / "out.ckpt")])
    text = str(err.value)
    assert text.startswith("mimzoo-import: error: ") and "\n" not in text, text
    assert re.search(message, text), text
    assert not (tmp_path / "out.ckpt").exists()


def test_a_foreign_relative_position_index_is_refused(tmp_path):
    sd = official_sd()
    sd["rel_pos_bias.relative_position_index"] = sd["rel_pos_bias.relative_position_index"].flip(0)
    with pytest.raises(
        ValueError,
        match=r"rel_pos_bias.relative_position_index is not the relative position index "
        r"of a 8x8 patch grid",
    ):
        load_official("beit", save_model(tmp_path, sd))


def test_contradicting_head_override_names_the_tables(tmp_path):
    with pytest.raises(ValueError, match=r"shape mismatches .*rel_pos_bias.relative_position_bias_table"):
        load_official("beit", save_model(tmp_path, official_sd()), encoder={"num_heads": 4})


def test_saved_args_are_plain_enough_for_a_safe_load(tmp_path):
    """``args`` as run_beit_pretraining.py saves it (tuples, lists, None) passes ``weights_only``."""
    path = save_model(tmp_path, official_sd())
    from mimzoo.checkpoints.convert import read_official

    ckpt = read_official(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].window_size == (GRID, GRID)
    assert isinstance(load_official("beit", path), BEiT)
