"""mimzoo-eval: each protocol end to end through the Hydra config, the real entry point, a linear probe
that really freezes the encoder, kNN voting, fine-tune loading / layer decay / drop path, clear errors."""

import json
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from conftest import TINY_MAE
from mimzoo import evaluate as ev
from mimzoo.data import MIMDataModule
from mimzoo.eval.finetune import FineTune
from mimzoo.eval.knn import knn_predict
from mimzoo.eval.linear import LinearProbe
from mimzoo.methods import MAE
from mimzoo.optim import warmup_cosine

FAST = [
    "data=cifar10_mini",
    "data.num_workers=0",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
]


def quiet_trainer(**kwargs):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny MAE pre-trained for two steps on cifar10-mini, saved the way mimzoo-train saves it."""
    torch.manual_seed(0)
    model = MAE(**TINY_MAE)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=MIMDataModule("cifar10-mini", batch_size=64, num_workers=0))
    path = tmp_path_factory.mktemp("pretrain") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def config(*overrides):
    with initialize_config_dir(config_dir=ev.CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=list(overrides))


# --- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["linear", "finetune", "knn"])
def test_protocol_end_to_end(protocol, ckpt, tmp_path, capsys):
    cfg = config(f"protocol={protocol}", f"ckpt={ckpt}", *FAST)
    assert cfg.data.train_aug == {"linear": "linear", "finetune": "finetune", "knn": "mae"}[protocol]
    results = ev.evaluate(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results and saved["protocol"] == protocol and saved["ckpt"] == str(ckpt)
    assert 0.0 <= saved["top1"] <= 1.0
    assert f"mimzoo-eval: {protocol} top-1 = {100 * saved['top1']:.2f}%" in capsys.readouterr().out
    if protocol == "knn":
        assert saved["bank_size"] == 512 and saved["num_queries"] == 256 and saved["k"] == 20
    else:
        assert saved["epochs"] == 1 and saved["steps"] == 2
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
        header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
        assert "val/top1" in header and "train/loss" in header


def test_console_entry_point(ckpt, tmp_path, monkeypatch, capsys):
    """The real ``@hydra.main``: defaults to the linear protocol, writes into hydra.run.dir."""
    monkeypatch.setattr(sys, "argv", ["mimzoo-eval", f"ckpt={ckpt}", *FAST, f"hydra.run.dir={tmp_path}"])
    ev.main()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "linear" and saved["recipe"]["blr"] == 0.1
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert f"results in {tmp_path / 'results.json'}" in capsys.readouterr().out


def test_protocol_defaults_follow_mae():
    linear = config("protocol=linear", "ckpt=x")
    assert linear.trainer.max_epochs == 90 and linear.protocol.warmup_epochs == 10
    assert (linear.protocol.blr, linear.protocol.momentum, linear.protocol.weight_decay) == (0.1, 0.9, 0.0)
    ft = config("protocol=finetune", "ckpt=x")
    assert ft.data.train_aug == "finetune" and ft.protocol.layer_decay == 0.65 and ft.protocol.blr == 5e-4
    assert (ft.protocol.mixup, ft.protocol.cutmix, ft.protocol.label_smoothing) == (0.8, 1.0, 0.1)
    # Command-line overrides still win over what the protocol sets.
    assert config("protocol=linear", "ckpt=x", "data.train_aug=none").data.train_aug == "none"


# --- linear probe -------------------------------------------------------------------------------
def test_linear_probe_trains_only_the_head(tiny_mae):
    probe = LinearProbe(tiny_mae, num_classes=10, blr=1.0, warmup_epochs=0)
    bn, linear = probe.head
    assert not bn.affine and not list(bn.parameters()) and bn.eps == 1e-6
    assert 0.005 < linear.weight.std() < 0.015 and not linear.bias.any()
    encoder_before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    head_before = linear.weight.clone()
    seen = []  # (training mode, grad enabled) inside the encoder at every forward
    probe.backbone.encoder.blocks[0].register_forward_hook(
        lambda m, i, o: seen.append((m.training, torch.is_grad_enabled()))
    )
    probe.train()  # what Lightning (or any caller) may do: the encoder must stay in eval mode regardless
    assert probe.head.training and not probe.backbone.training
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2)
    trainer.fit(probe, datamodule=MIMDataModule("fake", batch_size=16, num_workers=0, train_aug="linear"))
    after = probe.backbone.state_dict()
    assert all(torch.equal(encoder_before[k], after[k]) for k in after)
    assert not torch.equal(head_before, linear.weight)
    assert len(seen) == 4 and not any(training or grad for training, grad in seen)
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in probe.head.parameters()}
    # MAE's LARS: trust ratio on the weight matrix, plain momentum SGD without decay on the bias.
    weight, bias = optimizer.param_groups
    assert weight["params"][0] is linear.weight and weight["always_adapt"]
    assert bias["params"][0] is linear.bias and not bias["always_adapt"] and bias["weight_decay"] == 0


# --- kNN ------------------------------------------------------------------------------------------
def test_knn_separates_two_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bank = nn.functional.normalize(centres.repeat_interleave(10, 0) + 0.1 * torch.randn(20, 3, generator=gen), dim=1)
    labels = torch.arange(2).repeat_interleave(10)
    queries = nn.functional.normalize(centres.repeat(3, 1) + 0.1 * torch.randn(6, 3, generator=gen), dim=1)
    scores = knn_predict(bank, labels, queries, num_classes=2, k=5)
    assert torch.equal(scores.argmax(1), torch.tensor([0, 1, 0, 1, 0, 1]))


def test_knn_weights_votes_by_exp_similarity_over_t():
    """Two far neighbours of class 0 against one close neighbour of class 1: a plain majority (or a
    high temperature) picks class 0; exp(sim / 0.07) makes the close one win."""
    s = 0.75**0.5
    bank = torch.tensor([[0.9, 0.19**0.5, 0.0], [0.5, s, 0.0], [0.5, 0.0, s], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[1.0, 0.0, 0.0]])
    scores = knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07)
    assert scores.argmax(1).item() == 1
    assert torch.allclose(scores[0], torch.tensor([2 * torch.tensor(0.5 / 0.07).exp(), torch.tensor(0.9 / 0.07).exp()]))
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=10.0).argmax(1).item() == 0


# --- fine-tuning ------------------------------------------------------------------------------
def test_finetune_loads_the_encoder_into_a_global_pool_vit(tiny_mae):
    ft = FineTune.from_pretrained(tiny_mae, num_classes=10)
    _, exported = tiny_mae.export_timm()
    state = ft.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in exported.items() if not k.startswith("norm."))
    assert ft.model.global_pool == "avg" and isinstance(ft.model.norm, nn.Identity)
    assert isinstance(ft.model.fc_norm, nn.LayerNorm) and ft.model.head.out_features == 10
    assert ft.model.head.weight.std() < 1e-4 and not ft.model.head.bias.any()
    with pytest.raises(ValueError, match="do not fit"):
        ft.load_encoder({**exported, "decoder.embed.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not fit"):
        ft.load_encoder({k: v for k, v in exported.items() if not k.startswith("blocks.0.")})


def test_finetune_drop_path_and_loss(tiny_mae):
    ft = FineTune.from_pretrained(tiny_mae, num_classes=10, drop_path_rate=0.1)
    blocks = ft.model.blocks
    assert isinstance(blocks[0].drop_path1, nn.Identity) and blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(64, 3, 32, 32)
    torch.manual_seed(0)
    ft.model.train()
    assert not torch.equal(ft.model.forward_features(x), ft.model.forward_features(x))  # paths dropped at random
    ft.model.eval()
    assert torch.equal(ft.model.forward_features(x), ft.model.forward_features(x))
    assert ft.mixup is not None and isinstance(ft.criterion, SoftTargetCrossEntropy)
    plain = FineTune.from_pretrained(tiny_mae, num_classes=10, mixup=0.0, cutmix=0.0)
    assert plain.mixup is None and plain.criterion.label_smoothing == 0.1


def test_finetune_layer_decay(tiny_mae):
    ft = FineTune.from_pretrained(tiny_mae, num_classes=10, layer_decay=0.65)
    groups = ft.param_groups()
    name = {id(p): n for n, p in ft.model.named_parameters()}
    scale = {name[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {name[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    num_layers = 2 + 1  # depth + 1: stem 0, block k -> k + 1, head num_layers
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.65**num_layers)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** (num_layers - 1))
    assert scale["blocks.1.mlp.fc2.weight"] == pytest.approx(0.65)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["head.weight"] == 0.05 and decay["pos_embed"] == decay["cls_token"] == decay["head.bias"] == 0
    # The shared per-step schedule multiplies each group's lr by its lr_scale.
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    fake_trainer = SimpleNamespace(
        estimated_stepping_batches=100, max_epochs=10, max_steps=-1, num_training_batches=10, accumulate_grad_batches=1
    )
    warmup_cosine(optimizer, fake_trainer, warmup_epochs=1)["scheduler"].step_update(50)
    top = max(g["lr"] for g in optimizer.param_groups)
    assert all(g["lr"] == pytest.approx(top * g["lr_scale"]) for g in optimizer.param_groups)


# --- errors ---------------------------------------------------------------------------------------
def test_missing_or_invalid_checkpoint_is_a_clear_error(ckpt, tmp_path):
    with pytest.raises(ValueError, match="needs a checkpoint: pass ckpt="):
        ev.evaluate(config(*FAST), tmp_path)
    for missing in (tmp_path / "nope.ckpt", tmp_path):
        with pytest.raises(FileNotFoundError, match="is not a file"):
            ev.evaluate(config(f"ckpt={missing}", *FAST), tmp_path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        ev.evaluate(config(f"ckpt={garbage}", *FAST), tmp_path)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {}}, foreign)
    with pytest.raises(ValueError, match="not a mimzoo checkpoint"):
        ev.evaluate(config(f"ckpt={foreign}", *FAST), tmp_path)
    with pytest.raises(ValueError, match="set data.image_size=32"):
        ev.evaluate(config(f"ckpt={ckpt}", *FAST, "data.image_size=64"), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_missing_checkpoint_through_the_entry_point(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["mimzoo-eval", *FAST, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit):
        ev.main()
    assert "needs a checkpoint: pass ckpt=" in capsys.readouterr().err


def test_knn_caps_take_the_first_images():
    """protocol.max_bank / max_queries: the first N images of the unshuffled split, the last batch cut."""
    from mimzoo.evaluate import first_images

    batches = [(torch.full((4, 1), float(i)), torch.arange(4) + 4 * i) for i in range(3)]
    cut = list(first_images(batches, 6))
    assert [len(y) for _, y in cut] == [4, 2] and torch.equal(torch.cat([y for _, y in cut]), torch.arange(6))
    assert len(list(first_images(batches, None))) == 3 and len(list(first_images(batches, 100))) == 3
