"""BEiT stage 1: the dVAE tokenizer learns on cifar10-mini, tokenizes deterministically, follows its
schedules, round-trips through a checkpoint into the stage-2 Tokenizer interface, and trains from the CLI."""

import csv
import math
import os

import lightning as L
import pytest
import torch
from PIL import Image

from mimzoo.data import MIMDataModule
from mimzoo.methods import DVAE
from mimzoo.methods.beit import load_tokenizer
from mimzoo.methods.dvae import gumbel_temperature, kl_weight_at
from mimzoo.nn.tokenizer import DVAETokenizer

TINY_DVAE = dict(
    vae=dict(num_tokens=64, downsample=4, hidden_dim=32, code_dim=32, num_resblocks=0),
    kl=dict(weight=0.1, warmup=0.1, shape="linear"),
    optim=dict(lr=3e-3, warmup_epochs=0),
)


def datamodule():
    return MIMDataModule(
        name="cifar10-mini",
        root=os.environ["MIMZOO_DATA"],
        image_size=32,
        batch_size=64,
        num_workers=0,
        train_aug="none",
    )


@pytest.fixture(scope="module")
def trained():
    """A 48-step run (6 epochs of 8 batches); records the eval recon loss before and after, and the
    temperature / KL weight the module used at every step."""
    torch.manual_seed(0)
    dm = datamodule()
    dm.setup("fit")
    model = DVAE(**TINY_DVAE)
    images = next(iter(dm.val_dataloader()))[0]
    with torch.no_grad():
        before = model.eval()(images).logs["recon_loss"].item()
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, pl_module.tau(), pl_module.kl_weight()))

    trainer = L.Trainer(
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(model.train(), datamodule=dm)
    model.eval()
    with torch.no_grad():
        after = model(images).logs
    return dict(model=model, trainer=trainer, images=images, before=before, after=after, seen=seen)


def test_dvae_learns_and_uses_many_codes(trained):
    after = trained["after"]
    assert after["recon_loss"].item() < 0.5 * trained["before"], (trained["before"], after["recon_loss"].item())
    codes = trained["model"].tokenize(trained["images"])
    assert codes.unique().numel() > 8
    assert after["perplexity"].item() > 1.0 and 0 < after["codes_used"].item() <= 1


def test_schedules_follow_their_formulas_per_step(trained):
    total = trained["model"].total_steps
    assert total == 48
    for step, tau, klw in trained["seen"]:
        assert tau == pytest.approx(1.0 * (1 / 16) ** (step / total))
        assert klw == pytest.approx(0.1 * min(step / (0.1 * total), 1.0))
    assert gumbel_temperature(0, 100) == 1.0 and gumbel_temperature(100, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(50, 100) == pytest.approx(0.25)
    assert gumbel_temperature(75, 100, anneal=0.5) == pytest.approx(1 / 16)  # held at the end after annealing
    assert kl_weight_at(5, 100, 2.0, warmup=0.1, shape="cosine") == pytest.approx(1.0)
    assert kl_weight_at(5, 100, 2.0, warmup=0.1, shape="linear") == pytest.approx(1.0)
    assert kl_weight_at(2, 100, 2.0, warmup=0.1, shape="cosine") == pytest.approx(
        2.0 * 0.5 * (1 - math.cos(0.2 * math.pi))
    )
    assert kl_weight_at(50, 100, 2.0, warmup=0.1) == 2.0 and kl_weight_at(0, 100, 2.0, warmup=0.0) == 2.0


def test_tokenize_is_deterministic_argmax_on_the_grid():
    torch.manual_seed(0)
    model = DVAE(**TINY_DVAE).train()  # tokenize must not depend on the module's mode or Gumbel noise
    images = torch.randn(4, 3, 32, 32)
    a, b = model.tokenize(images), model.tokenize(images)
    assert a.dtype == torch.long and a.shape == (4, 8 * 8) and torch.equal(a, b)
    logits = model.vae.logits(model.to_pixels(images))
    assert torch.equal(a, logits.argmax(1).flatten(1))  # row-major argmax
    tok = model.tokenizer()
    assert (tok.num_tokens, tok.downsample, tok.grid_size(32)) == (64, 4, (8, 8))
    assert torch.equal(tok.tokenize(images), a) and not tok.training
    assert tok.tokenize(torch.randn(2, 3, 64, 64)).shape == (2, 64)  # resized to the 32px it was trained on


def test_checkpoint_to_tokenizer_gives_the_same_codes(trained, tmp_path):
    from mimzoo.checkpoints import load_pretrained

    path = tmp_path / "dvae.ckpt"
    trained["trainer"].save_checkpoint(path)
    tok = load_tokenizer({"kind": "dvae", "ckpt": str(path)})
    assert isinstance(tok, DVAETokenizer) and tok.num_tokens == 64
    images = trained["images"]
    assert torch.equal(tok.tokenize(images), trained["model"].tokenize(images))
    assert torch.equal(load_pretrained(path).tokenize(images), trained["model"].tokenize(images))


def test_clear_tokenizer_errors(tmp_path, tiny_mae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer({"kind": "dvae", "ckpt": str(tmp_path / "missing.ckpt")})
    ckpt = {"state_dict": tiny_mae.state_dict(), "hyper_parameters": {}}
    tiny_mae.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "mae.ckpt")
    with pytest.raises(ValueError, match="not a mimzoo dVAE checkpoint.*mimzoo.methods.mae.MAE"):
        load_tokenizer({"kind": "dvae", "ckpt": str(tmp_path / "mae.ckpt")})
    with pytest.raises((ImportError, FileNotFoundError), match="DALL-E|encoder.pkl"):
        load_tokenizer({"kind": "dalle", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "vqgan"})


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cli):
    """``mimzoo-train experiment=dvae`` (model=dvae + its optimiser) on cifar10-mini, tiny: 2 epochs of 8 steps."""
    run_dir = tmp_path_factory.mktemp("dvae_run")
    cli(
        "train",
        "experiment=dvae",
        "data=cifar10_mini",
        "data.batch_size=64",
        "data.num_workers=0",
        "model.vae.num_tokens=64",
        "model.vae.hidden_dim=16",
        "model.vae.code_dim=16",
        "model.vae.num_resblocks=0",
        "optim.lr=3e-3",
        "optim.warmup_epochs=0",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir


@pytest.mark.slow
def test_cli_trains_a_dvae(stage1):
    tmp_path = stage1
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mimzoo"]["method"] == "mimzoo.methods.dvae.DVAE"
    panel = Image.open(tmp_path / "reconstructions" / "epoch_0001.png")
    assert panel.size[1] == 2 * 33 + 1  # two rows (original | reconstruction), no masked row
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    columns = set(rows[0])
    for key in (
        "train/loss",
        "train/recon_loss",
        "train/kl",
        "train/tau",
        "train/kl_weight",
        "train/perplexity",
        "train/codes_used",
        "val/loss",
        "val/recon_loss",
    ):
        assert key in columns, key
    assert "probe/knn_top1" not in columns  # no features() to probe


@pytest.mark.slow
def test_two_stage_dvae_then_beit_through_the_cli(stage1, tmp_path, cli):
    """Stage 2 reads the stage-1 checkpoint through load_tokenizer: 64 codes on the 8x8 patch grid."""
    ckpt = stage1 / "checkpoints" / "last.ckpt"
    cli(
        "train",
        "experiment=beit",
        "model/encoder=test",
        f"model.tokenizer.ckpt={ckpt}",
        "model.num_tokens=64",
        "data=cifar10_mini",
        "data.batch_size=64",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "probe.knn.max_bank=128",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
    )
    beit = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert beit["mimzoo"]["method"] == "mimzoo.methods.beit.BEiT"
    assert beit["hyper_parameters"]["tokenizer"]["ckpt"] == str(ckpt)
    assert beit["hyper_parameters"]["mask"] == {
        "name": "block",
        "ratio": 0.4,
        "min_num_patches": 16,
        "max_num_patches": None,
        "min_aspect": 0.3,
        "max_aspect": None,
        "exact": False,
    }


@pytest.mark.slow
def test_beit_checkpoint_evaluates_and_exports(stage1, tmp_path, cli):
    """Stage 2 through the CLI, then mimzoo-eval (kNN) and the export to a strict-loading timm Beit."""
    import json

    import timm

    from mimzoo.checkpoints import export_encoder

    ckpt = stage1 / "checkpoints" / "last.ckpt"
    run = tmp_path / "beit"
    cli(
        "train",
        "experiment=beit",
        "model/encoder=test",
        f"model.tokenizer.ckpt={ckpt}",
        "data=cifar10_mini",
        "data.batch_size=64",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "probe.knn.enabled=false",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    beit_ckpt = run / "checkpoints" / "last.ckpt"
    cli(
        "evaluate",
        "protocol=knn",
        f"ckpt={beit_ckpt}",
        "data=cifar10_mini",
        "data.num_workers=0",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'knn'}",
    )
    assert 0 <= json.loads((tmp_path / "knn" / "results.json").read_text())["top1"] <= 1
    kwargs = export_encoder(beit_ckpt, tmp_path / "beit.pth")
    model = timm.create_model(**kwargs)
    model.load_state_dict(torch.load(tmp_path / "beit.pth"), strict=True)
    assert type(model).__name__ == "Beit"
