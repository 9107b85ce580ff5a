"""End to end through the real ``mimzoo-train`` entry point on cifar10-mini: train, checkpoint,
resume, reproduce from a seed, sweep (one dir per point, a shared W&B group), and clear errors."""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("run")
    proc = cli("train", *TINY, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_config_and_panels(first_run):
    run_dir, proc = first_run
    ckpt = weights(run_dir)
    assert ckpt["global_step"] == 8 and ckpt["mimzoo"]["method"] == "mimzoo.methods.mae.MAE"
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.model._target_ == "mimzoo.methods.MAE" and cfg.mask.ratio == 0.75
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss" in header and "probe/knn_top1" in header
    assert list((run_dir / "reconstructions").glob("epoch_*.png"))
    assert f"checkpoint      {run_dir}" in proc.stdout and "final metrics" in proc.stdout


@pytest.mark.slow
def test_run_cost_is_recorded(first_run, tiny_mae):
    """cost.json: what the run took, and FLOPs that include the backward (about 3x the forward's)."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from mimzoo.precision import configure_attention, resolve_precision

    cost = json.loads((Path(first_run[0]) / "cost.json").read_text())
    assert cost["steps"] == 8 and cost["epochs"] == 1 and cost["images_seen"] == 8 * 64
    assert cost["wall_clock_s"] > 0 and cost["train_images_per_s"] > 0 and cost["peak_memory_mb"] > 100
    assert cost["precision"] == resolve_precision("auto") and cost["device"] == "cpu"
    assert cost["params"] == sum(p.numel() for p in tiny_mae.parameters())  # TINY is TINY_MAE
    assert cost["encoder_params"] == sum(p.numel() for p in tiny_mae.encoder.parameters())
    configure_attention(tiny_mae, cost["precision"], "cpu")  # the kernel the run used: the counts differ
    with FlopCounterMode(display=False) as forward:
        tiny_mae.train()(torch.randn(64, 3, 32, 32))
    assert 2.9 < cost["gflops_per_image"] * 1e9 * 64 / forward.get_total_flops() < 3.6


@pytest.mark.slow
def test_resume_continues_from_last(first_run, tmp_path, cli):
    run_dir, _ = first_run
    resumed = tmp_path / "resumed"
    # Resume a copy in its own directory so the first run stays intact for the other tests.
    import shutil

    shutil.copytree(run_dir, resumed)
    before = weights(resumed)
    cli("train", *TINY, "trainer.max_epochs=2", "logger=csv", f"hydra.run.dir={resumed}", "ckpt_path=last")
    after = weights(resumed)
    assert after["global_step"] == 16 and after["epoch"] == 1
    import json  # the cost counters continue across the resume

    cost = [json.loads((d / "cost.json").read_text()) for d in (run_dir, resumed)]
    assert cost[1]["images_seen"] == 2 * cost[0]["images_seen"] and cost[1]["wall_clock_s"] > cost[0]["wall_clock_s"]
    assert cost[1]["gflops_per_image"] == cost[0]["gflops_per_image"]
    # The optimiser state was restored, not restarted: Adam's step count continues from 8.
    state = next(iter(after["optimizer_states"][0]["state"].values()))
    assert int(state["step"]) == 16
    assert not torch.equal(
        before["state_dict"]["encoder.blocks.0.attn.qkv.weight"],
        after["state_dict"]["encoder.blocks.0.attn.qkv.weight"],
    )


@pytest.mark.slow
def test_resume_without_checkpoint_is_a_clear_error(tmp_path, cli):
    proc = cli(
        "train",
        *TINY,
        "trainer.max_epochs=1",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
        "ckpt_path=last",
        expect_ok=False,
    )
    assert proc.returncode != 0 and "hydra.run.dir=<that run dir> ckpt_path=last" in proc.stderr


@pytest.mark.slow
def test_same_seed_reproduces_the_run(tmp_path, cli):
    common = ["trainer.max_steps=3", "logger=csv", "probe.knn.enabled=false", "recon.enabled=false"]
    for name in ("a", "b"):
        cli("train", *TINY, *common, f"hydra.run.dir={tmp_path / name}")
    cli("train", *TINY, *common, "seed=1", f"hydra.run.dir={tmp_path / 'c'}")
    a, b, c = (weights(tmp_path / n)["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_sweep_one_dir_per_point_and_shared_wandb_group(tmp_path, cli):
    sweep = tmp_path / "sweep"
    env_mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        cli(
            "train",
            "-m",
            *TINY,
            "mask.ratio=0.5,0.75",
            "model.decoder.depth=1,2",  # Hydra wants -m first
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "probe.knn.enabled=false",
            f"hydra.sweep.dir={sweep}",
        )
    finally:
        os.environ["WANDB_MODE"] = env_mode or "disabled"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4
    points = set()
    group = str(sweep).replace("/", "_").encode()
    for run in runs:
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        points.add((cfg.mask.ratio, cfg.model.decoder.depth))
        assert (run / "checkpoints" / "last.ckpt").exists() and (run / "metrics.csv").exists()
        wandb_file = next(run.glob("wandb/offline-run-*/run-*.wandb"))
        assert group in wandb_file.read_bytes()  # every run of the sweep carries the same group
    assert points == {(0.5, 1), (0.5, 2), (0.75, 1), (0.75, 2)}
    # mimzoo-report turns the real sweep into a table and a plot.
    from mimzoo.report import report

    result = report(sweep, metric="val/loss")
    table = (sweep / "report.md").read_text()
    assert "mask.ratio" in table and "model.decoder.depth" in table and table.count("\n| ") >= 5
    assert (sweep / "report.png").stat().st_size > 0 and result["paths"]["png"] == sweep / "report.png"
    # The returned summary is the sweep's: its two swept keys, one row per point, each with the run's val/loss.
    assert result["metric"] == "val/loss" and set(result["swept"]) == {"mask.ratio", "model.decoder.depth"}
    rows = result["rows"]
    assert sorted((r["mask.ratio"], r["model.decoder.depth"]) for r in rows) == [
        ("0.5", "1"),
        ("0.5", "2"),
        ("0.75", "1"),
        ("0.75", "2"),
    ]
    assert all(isinstance(r["val/loss"], float) and r["note"] == "" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("mask.ratio=1.0", "mask ratio must lie in (0, 1)"),
        ("model.encoder.patch_size=5", "not divisible by patch size"),
        ("mask=nonexistent", "Could not find 'mask/nonexistent'"),
        ("data.root=/nonexistent", "MIMZOO_DATA"),
    ],
)
def test_config_errors_reach_the_user(tmp_path, cli, override, message):
    proc = cli(
        "train", *TINY, "trainer.max_steps=1", "logger=csv", f"hydra.run.dir={tmp_path}", override, expect_ok=False
    )
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


def test_slurm_launcher_and_ddp_configs_compose():
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2", "hydra/launcher=slurm"],
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.additional_parameters.signal == "USR1@120"  # checkpoint + requeue before the time limit
    assert cfg.trainer.strategy == "ddp"


@pytest.mark.slow
def test_bf16_mixed_precision_from_config(tmp_path, cli):
    cli(
        "train",
        *TINY,
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
        "logger=csv",
        "probe.knn.enabled=false",
        f"hydra.run.dir={tmp_path}",
    )
    ckpt = weights(tmp_path)
    assert ckpt["global_step"] == 2 and ckpt["state_dict"]["encoder.cls_token"].dtype == torch.float32


def test_each_model_brings_its_mask_and_optimiser():
    """``model=X`` composes the mask and optimiser presets its config names (no per-model copies); an explicit
    ``mask=``/``optim.`` wins; a mask-free model (dVAE) has no mask and builds."""
    from hydra import compose, initialize_config_dir

    from mimzoo.train import CONFIG_DIR, build_model

    models = sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml"))
    assert {"mae", "beit", "dvae", "ibot", "convmae", "sgmae"} <= set(models)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        mae = compose(config_name="train")
        beit = compose(config_name="train", overrides=["experiment=beit", "model.tokenizer.ckpt=x.ckpt"])
        chosen = compose(config_name="train", overrides=["model=beit", "mask=random", "mask.ratio=0.5"])
        dvae = compose(config_name="train", overrides=["model=dvae", "model.vae.num_tokens=16"])
        composed = {name: compose(config_name="train", overrides=[f"model={name}"]) for name in models}
    assert mae.mask == {"name": "random", "ratio": 0.75} and mae.optim.betas == [0.9, 0.95]
    assert beit.model._target_ == "mimzoo.methods.BEiT" and beit.mask.name == "block" and beit.mask.exact is False
    assert beit.optim.betas == [0.9, 0.999] and beit.trainer.gradient_clip_val == 3.0
    assert chosen.mask == {"name": "random", "ratio": 0.5} and chosen.optim.blr == 1.875e-4
    for name, cfg in composed.items():  # every model has its recipe, so model=X alone composes
        assert "optim" in cfg and ("mask" in cfg) == (name != "dvae"), name
    assert composed["convmae"].mask.name == "multiscale" and composed["convmae"].optim == mae.optim
    assert composed["ibot"].mask.name == "ibot" and composed["sgmae"].mask == mae.mask
    assert composed["sgmae"].optim == mae.optim
    assert "mask" not in dvae and build_model(dvae).hparams.keys() >= {"optim", "vae"}
    assert dvae.model._target_ == "mimzoo.methods.DVAE" and dvae.optim.blr == 1.0e-3
