"""experiment=compare_cifar: every method on equal terms, BEiT's dVAE as a prerequisite stage trained once and reused,
and the untrained network as the floor."""

import json

import pytest
from hydra import compose, initialize_config_dir

from mimzoo.runs import CONFIG_DIR
from mimzoo.train import build_model

METHODS = ["untrained", "mae", "convmae", "sgmae", "simmim", "ibot"]


def composed(*overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["experiment=compare_cifar", *overrides], return_hydra_config=False)


def test_the_preset_sweeps_every_method_and_the_floor():
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=compare_cifar"], return_hydra_config=True)
    assert set(cfg.hydra.sweeper.params.compare.split(",")) == {*METHODS, "beit"}


def test_equal_terms_same_data_budget_lr_and_backbone_size():
    shared = set()
    sizes = {}
    for method in METHODS:
        cfg = composed(f"compare={method}")
        shared.add(
            (
                cfg.data.name,
                cfg.data.image_size,
                cfg.data.patch_size,
                cfg.data.batch_size,
                cfg.optim.lr,
                cfg.trainer.max_epochs,
                cfg.trainer.limit_train_batches,
                tuple(cfg.offline_eval.protocols),
            )
        )
        model = build_model(cfg)
        sizes[method] = sum(p.numel() for p in model.eval_encoder.parameters())
    assert len(shared) == 1, shared
    assert max(sizes.values()) / min(sizes.values()) < 1.02, sizes
    assert composed("compare=untrained").trainer.max_steps == 0


def test_beit_tokenizer_is_a_prerequisite_that_follows_the_run():
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mimzoo.train import prerequisite_overrides

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=compare_cifar",
                "compare=beit",
                "data=cifar10_mini",
                "trainer.max_epochs=3",
                "trainer.limit_train_batches=null",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)  # as in a job: ${hydra:runtime.choices.data} resolves
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["model"]["tokenizer"]["ckpt"] == "${prerequisites.tokenizer.run_dir}/checkpoints/last.ckpt"
    assert raw["prerequisites"]["tokenizer"]["run_dir"] == "${hydra:runtime.output_dir}/../tokenizer"
    overrides = prerequisite_overrides(cfg.prerequisites.tokenizer)
    assert {"compare=dvae", "data=cifar10_mini", "trainer.max_epochs=3", "data.batch_size=128"} <= set(overrides)
    # Hydra reads the command line back to the same config: an unlimited budget stays null, not the string "None".
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        stage = compose("train", overrides=overrides)
    assert stage.trainer.limit_train_batches is None and stage.trainer.max_epochs == 3


TINY_COMPARE = [
    "data=cifar10_mini",
    "model.encoder.embed_dim=32",
    "model.encoder.depth=2",
    "model.encoder.num_heads=2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "probe.knn.max_bank=256",
    "offline_eval.protocols=[knn]",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_beit_trains_its_tokenizer_once_and_the_floor_is_evaluated(tmp_path, cli):
    sweep = tmp_path / "sweep"
    cli("train", "-m", "experiment=compare_cifar", "compare=untrained,beit", *TINY_COMPARE, f"hydra.sweep.dir={sweep}")
    tokenizer = sweep / "tokenizer"
    assert (tokenizer / "checkpoints" / "last.ckpt").is_file() and (tokenizer / "cost.json").is_file()
    for run in ("0", "1"):  # the floor (untrained) and BEiT, each evaluated at its end
        assert 0 < json.loads((sweep / run / "eval" / "knn" / "results.json").read_text())["top1"] <= 1
    assert json.loads((sweep / "0" / "cost.json").read_text())["steps"] == 0
    proc = cli("offline_eval", str(sweep))  # the sweep command agrees: both done, the tokenizer stage skipped
    assert "skip tokenizer: a tokenizer stage" in proc.stdout and "0 evaluated, 2 done already" in proc.stdout
    cli("report", str(sweep), "--no-wandb")  # a method x protocol table with costs; the floor says what it is
    table = (sweep / "report.md").read_text()
    assert "kNN top-1 (offline)" in table and "GFLOPs/img" in table and "untrained (trainer.max_steps=0)" in table
    assert "| beit |" in table and "| dvae |" in table  # the tokenizer stage's row: its cost is part of BEiT's
    assert table.startswith("# kNN top-1 (offline) by compare\n")  # its own overrides are not swept keys
    assert "prerequisite stage (no encoder to evaluate)" in table
    stamp = (tokenizer / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    # Another BEiT run of the same sweep (its directory beside the others) reuses the finished stage.
    cli("train", "experiment=compare_cifar", "compare=beit", *TINY_COMPARE, f"hydra.run.dir={sweep / 'again'}")
    assert f"prerequisite tokenizer: reusing {tokenizer}" in (sweep / "again" / "train.log").read_text()
    assert (tokenizer / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp
