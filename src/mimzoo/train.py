"""``mimzoo-train``: compose model/mask/data/optim/trainer/logger configs and pre-train.

Each run (and each point of a ``-m`` sweep) writes into its own Hydra directory: the resolved
config (``.hydra/``), ``checkpoints/`` (``last.ckpt`` included), ``metrics.csv``, ``wandb/``,
``reconstructions/`` and, with ``offline_eval.protocols``, ``eval/<protocol>/`` (:mod:`mimzoo.offline_eval`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from mimzoo.callbacks import LoggedStepsProgressBar, LoggedThroughput, LogIntervalFit, ReconstructionPanels, RunCost
from mimzoo.callbacks.preemption import Preemption, cluster_plugins, requeued_ckpt_path
from mimzoo.checkpoints import read_checkpoint
from mimzoo.cli import check_cpu_devices, prepare_argv, route_logs_to_job_log, silence_unactionable_warnings
from mimzoo.data import primary_view
from mimzoo.errors import CheckpointError, MissingFileError, UserError, user_errors
from mimzoo.eval.online import OnlineKNN, OnlineLinearProbe
from mimzoo.offline_eval import check_config as check_offline_eval
from mimzoo.offline_eval import evaluate_run
from mimzoo.precision import apply_precision
from mimzoo.rundir import AtomicCheckpointIO, MetricsHistory, checkpoint_callbacks, claim_run_dir, release_run_dir
from mimzoo.runs import CONFIG_DIR, build_loggers

summary_log = logging.getLogger("mimzoo.summary")  # the run's summary in the job log (train.log), printed on stdout


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
        *checkpoint_callbacks(cfg, run_dir / "checkpoints"),  # last.ckpt, plus kept ones when checkpoint.keep_* ask
        MetricsHistory(),  # a resume keeps the metrics.csv rows its checkpoint covers
        LearningRateMonitor(logging_interval="step"),
        # img/s over each log interval, timed where the loggers write: no GPU sync per step
        LoggedThroughput(batch_size_fn=lambda batch: primary_view(batch[0]).shape[0], window_size=2),
        LogIntervalFit(),
        Preemption(run_dir / "checkpoints" / "last.ckpt"),  # SIGTERM/SIGUSR1: checkpoint, exit != 0, SLURM requeue
        RunCost(run_dir / "cost.json", count_flops=not cfg.compile),  # wall-clock, img/s, FLOPs, memory, size
    ]
    if cfg.trainer.enable_progress_bar:  # reads the loss where the loggers do, not every step
        callbacks.append(LoggedStepsProgressBar())
    if cfg.recon.enabled:
        callbacks.append(
            ReconstructionPanels(str(run_dir / "reconstructions"), cfg.recon.num_images, cfg.recon.every_n_epochs)
        )
    probe = model.has_features  # a tokenizer stage (dVAE) has no representation to probe
    if cfg.probe.knn.enabled and probe:
        callbacks.append(
            OnlineKNN(cfg.probe.knn.k, cfg.probe.knn.temperature, cfg.probe.knn.every_n_epochs, cfg.probe.knn.max_bank)
        )
    if cfg.probe.linear.enabled and probe:
        callbacks.append(OnlineLinearProbe(cfg.probe.linear.lr))
    return callbacks


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` -> this run directory's ``checkpoints/last.ckpt``; a path must exist."""
    if ckpt_path is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.exists():
        raise MissingFileError(
            f"no checkpoint at {path}. To resume a run, start it again in its own directory: "
            "mimzoo-train <same overrides> hydra.run.dir=<that run dir> ckpt_path=last"
        )
    return str(path)


def check_resume_checkpoint(ckpt_path: str | None) -> None:
    """A checkpoint to resume from must be readable before anything is built: a 0-byte or truncated file (a save
    that was killed) is named with the other checkpoints of its folder that could be used instead. Nothing is
    deleted or written."""
    if ckpt_path is None:
        return
    path = Path(ckpt_path)
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_size > 0),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    instead = (
        f"resume from another checkpoint of this run, e.g. ckpt_path={others[0]}"
        if others
        else f"no other checkpoint is in {path.parent}: start afresh in a new run directory"
    )
    try:
        read_checkpoint(path, mmap=True, fix=f"it was left as it is; {instead}")
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}") from err


def prerequisite_overrides(stage: DictConfig) -> list[str]:
    """A stage's ``overrides`` mapping as a command line, each resolved value written as Hydra reads it back
    (``null``, ``true``), not as Python prints it (``None``, ``True``)."""

    def value(v) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"{key}={value(v)}" for key, v in stage.overrides.items()]


def train_prerequisites(cfg: DictConfig) -> None:
    """``prerequisites``: runs this one needs first (BEiT's dVAE tokenizer), each trained once in its own run
    directory (``mimzoo-train <overrides> hydra.run.dir=<run_dir>``) and reused by every later job that names the
    same directory. A finished stage (its ``cost.json`` is written at the end of fit) is reused as it is; an
    interrupted one (a ``last.ckpt`` but no ``cost.json``) is resumed; a failed one stops this job with its log."""
    for name, stage in (cfg.get("prerequisites") or {}).items():
        run_dir = Path(stage.run_dir).resolve()
        if (run_dir / "cost.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file():
            summary_log.info(f"mimzoo: prerequisite {name}: reusing {run_dir}")
            continue
        resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
        cmd = [
            sys.executable,
            "-m",
            "mimzoo.train",
            *prerequisite_overrides(stage),
            *resume,
            f"hydra.run.dir={run_dir}",
        ]
        summary_log.info(f"mimzoo: prerequisite {name}: training it first in {run_dir}")
        if subprocess.run(cmd).returncode != 0:
            raise UserError(
                f"prerequisite {name!r} failed to train: see {run_dir / 'train.log'}; fix it and rerun "
                "(a stage that wrote a checkpoint resumes from it)"
            )


def train(cfg: DictConfig) -> dict:
    """Run one pre-training job; returns the last logged metrics."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_cpu_devices(cfg.trainer)
    # One live run per directory; a resume that changes the experiment is refused here, before anything is built.
    lock = claim_run_dir(cfg, run_dir, "mimzoo-train", resume=cfg.ckpt_path is not None)
    offline = cfg.get("offline_eval")
    if offline is not None and offline.protocols:
        check_offline_eval(run_dir, offline)  # a bad override fails now, not after the pre-training
    train_prerequisites(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    model = build_model(cfg)
    datamodule = build_datamodule(cfg, model)
    ckpt_path = resolve_ckpt_path(requeued_ckpt_path(cfg.ckpt_path, run_dir), run_dir)
    check_resume_checkpoint(ckpt_path)
    precision = apply_precision(cfg.trainer, model)
    trainer = instantiate(
        cfg.trainer,
        precision=precision,
        callbacks=build_callbacks(cfg, run_dir, model),
        logger=build_loggers(cfg, run_dir),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
    )
    fit_model = torch.compile(model) if cfg.compile else model
    trainer.fit(fit_model, datamodule=datamodule, ckpt_path=ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.trainer.max_steps == 0 and not last.exists():  # the untrained network, the floor of a comparison
        trainer.save_checkpoint(last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        summarize(run_dir, trainer, metrics)
        if offline is not None and offline.protocols and not trainer.interrupted and model.has_features:
            # (a tokenizer stage, the dVAE, has no encoder to evaluate: a preset's offline_eval skips it)
            # In this job, so a SLURM sweep evaluates each point in its own job; the W&B run is still live here.
            evaluate_run(
                run_dir,
                list(offline.protocols),
                progress=lambda protocol, done: print(
                    f"mimzoo: offline {protocol}: " + ("done already (results.json)" if done else "evaluating"),
                    flush=True,
                ),
            )
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a -m sweep starts its own W&B run
    release_run_dir(lock)
    return metrics


def summarize(run_dir: Path, trainer, metrics: dict) -> None:
    """Where everything is, on stdout and in the job log (``train.log``)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    lines = [
        f"mimzoo: run directory   {run_dir}",
        f"mimzoo: checkpoint      {last}" if last.is_file() else "mimzoo: checkpoint      none written",
        f"mimzoo: metrics (CSV)   {run_dir / 'metrics.csv'}",
    ]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            online = run.settings.mode == "online"
            where = run.url if online else f"{run.dir} (sync offline runs with `wandb sync`)"
            lines.append(f"mimzoo: W&B run         {where}")
    recon = sorted((run_dir / "reconstructions").glob("*.png"))
    if recon:
        lines.append(f"mimzoo: reconstructions {recon[-1]}")
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("train/loss", "val/", "probe/"))}
    lines.append(f"mimzoo: final metrics   {shown}")
    print("\n" + "\n".join(lines))
    for line in lines:
        summary_log.info(line)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    route_logs_to_job_log()
    with user_errors("mimzoo-train"):
        metrics = train(cfg)
    return metrics.get(cfg.get("objective") or "", None)


def main():
    """``mimzoo-train``: Hydra's command line, with paths holding ``=`` (Lightning's checkpoint names) quoted for
    it, and bad input reported as one line ``mimzoo-train: error: ...`` (exit code 2)."""
    prepare_argv("mimzoo-train")
    silence_unactionable_warnings()
    return hydra_main()


if __name__ == "__main__":
    main()
