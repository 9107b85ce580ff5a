"""What every entry point shares: the packaged config dir and the loggers of a run directory."""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from mimzoo.rundir import HistoryCSVLogger

# The Hydra configs ship inside the package (mimzoo/conf), so a non-editable install finds them too.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def wandb_mode(requested: str) -> str:
    """``auto`` -> ``online`` when an API key is configured (env or netrc), else ``offline``."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def wandb_settings(mode: str):
    """W&B's own console lines are off: the run summary names the W&B run (its URL, or the offline folder and
    `wandb sync`). Online, ``quiet`` drops the version line and the run history and keeps W&B's warnings; an
    offline run prints its header ("syncing is set to offline", where the data is, a `wandb leet` tip) unless
    ``silent``, so offline runs are silent."""
    import wandb

    return wandb.Settings(silent=True) if mode == "offline" else wandb.Settings(quiet=True)


def sweep_group_name(sweep_dir: Path) -> str:
    """A sweep's W&B group: its directory as given to Hydra (``multirun/<preset>/<date>_<time>``), ``/`` -> ``_``;
    ``mimzoo-report`` logs the sweep's table into the same group."""
    return Path(sweep_dir).as_posix().replace("/", "_")


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """``metrics.csv`` in ``run_dir`` (a resume, ``ckpt_path`` set, appends to it), and a W&B run (the same run,
    continued, when the run directory is resumed) when ``logger.wandb`` is on."""
    loggers = [HistoryCSVLogger(save_dir=str(run_dir), resume=cfg.get("ckpt_path") is not None)]
    wb = cfg.logger.wandb
    if wb.enabled:
        hc = HydraConfig.get()
        sweep = hc.mode == RunMode.MULTIRUN
        group = wb.group or (sweep_group_name(Path(hc.sweep.dir)) if sweep else None)
        name = hc.job.override_dirname or run_dir.name
        id_file = run_dir / "wandb_id.txt"  # same W&B run when this run directory is resumed
        if not id_file.exists() and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            id_file.write_text(uuid.uuid4().hex[:8])
        run_id = id_file.read_text().strip() if id_file.exists() else None
        mode = wandb_mode(wb.mode)
        logger = WandbLogger(
            project=wb.project,
            entity=wb.entity,
            group=group,
            name=name,
            tags=list(wb.tags),
            save_dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb_settings(mode),
        )
        # Lightning always hands wandb.init ``anonymous`` (None here), a setting wandb>=0.19 deprecates with a
        # warning whatever its value; nothing else reads it.
        logger._wandb_init.pop("anonymous", None)
        loggers.append(logger)
    return loggers
