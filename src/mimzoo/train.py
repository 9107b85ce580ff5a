"""``mimzoo-train``: compose model/mask/data/optim/trainer/logger configs and pre-train.

Each run (and each point of a ``-m`` sweep) writes into its own Hydra directory: the resolved
config (``.hydra/``), ``checkpoints/`` (``last.ckpt`` included), ``metrics.csv``, ``wandb/`` and
``reconstructions/``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from mimzoo.callbacks import ReconstructionPanels
from mimzoo.callbacks.preemption import Preemption, cluster_plugins, requeued_ckpt_path
from mimzoo.data import primary_view
from mimzoo.eval.online import OnlineKNN, OnlineLinearProbe
from mimzoo.runs import CONFIG_DIR, build_loggers


def build_model(cfg: DictConfig):
    """The method module from ``model`` + the ``mask`` and ``optim`` its config brings (plain containers, so
    checkpoints keep them); a mask-free model (the dVAE) brings no mask."""
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("mask", "optim") if key in cfg}
    return instantiate(cfg.model, **parts, _convert_="all")


def build_datamodule(cfg: DictConfig, model):
    """The data module of ``data``, training on the views the method asks for (iBOT: multi-crop)."""
    datamodule = instantiate(cfg.data)
    datamodule.train_views = model.train_views
    return datamodule


def build_callbacks(cfg: DictConfig, run_dir: Path, model) -> list:
    callbacks = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=cfg.checkpoint.save_top_k,
                        monitor=cfg.checkpoint.monitor, every_n_epochs=cfg.checkpoint.every_n_epochs,
                        every_n_train_steps=cfg.checkpoint.every_n_train_steps, enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        ThroughputMonitor(batch_size_fn=lambda batch: primary_view(batch[0]).shape[0], window_size=10),
        Preemption(run_dir / "checkpoints" / "last.ckpt"),  # SIGTERM/SIGUSR1: checkpoint, exit != 0, SLURM requeue
    ]
    if cfg.recon.enabled:
        callbacks.append(ReconstructionPanels(str(run_dir / "reconstructions"), cfg.recon.num_images,
                                              cfg.recon.every_n_epochs))
    probe = model.has_features  # a tokenizer stage (dVAE) has no representation to probe
    if cfg.probe.knn.enabled and probe:
        callbacks.append(OnlineKNN(cfg.probe.knn.k, cfg.probe.knn.temperature, cfg.probe.knn.every_n_epochs,
                                   cfg.probe.knn.max_bank))
    if cfg.probe.linear.enabled and probe:
        callbacks.append(OnlineLinearProbe(cfg.probe.linear.lr))
    return callbacks


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` -> this run directory's ``checkpoints/last.ckpt``; a path must exist."""
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {path}. To resume a run, start it again in its own directory: "
            "mimzoo-train <same overrides> hydra.run.dir=<that run dir> ckpt_path=last"
        )
    return str(path)


def train(cfg: DictConfig) -> dict:
    """Run one pre-training job; returns the last logged metrics."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    model = build_model(cfg)
    datamodule = build_datamodule(cfg, model)
    ckpt_path = resolve_ckpt_path(requeued_ckpt_path(cfg.ckpt_path, run_dir), run_dir)
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg, run_dir, model),
                          logger=build_loggers(cfg, run_dir), default_root_dir=str(run_dir), plugins=cluster_plugins())
    fit_model = torch.compile(model) if cfg.compile else model
    trainer.fit(fit_model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        summarize(run_dir, trainer, metrics)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a -m sweep starts its own W&B run
    return metrics


def summarize(run_dir: Path, trainer, metrics: dict) -> None:
    print(f"\nmimzoo: run directory   {run_dir}")
    print(f"mimzoo: checkpoint      {run_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"mimzoo: metrics (CSV)   {run_dir / 'metrics.csv'}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            print(f"mimzoo: W&B run         {logger.experiment.dir} (sync offline runs with `wandb sync`)")
    recon = sorted((run_dir / "reconstructions").glob("*.png"))
    if recon:
        print(f"mimzoo: reconstructions {recon[-1]}")
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("train/loss", "val/", "probe/"))}
    print(f"mimzoo: final metrics   {shown}")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("objective") or "", None)


if __name__ == "__main__":
    main()
