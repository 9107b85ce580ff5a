"""``mimzoo-eval protocol=linear|finetune|knn ckpt=<mimzoo checkpoint>``: top-1 of a pre-trained encoder.

Each run writes into its own Hydra directory (one live run at a time: ``mimzoo.lock``): the resolved config
(``.hydra/``), ``results.json``, and for the trained protocols ``metrics.csv``, ``wandb/`` and ``checkpoints/``
(best by val/top1 and last, written atomically; a linear probe's hold the head only, see :class:`LinearProbe`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

from mimzoo.callbacks import LogIntervalFit
from mimzoo.checkpoints import load_pretrained
from mimzoo.cli import check_cpu_devices, prepare_argv, route_logs_to_job_log, silence_unactionable_warnings
from mimzoo.errors import ConfigError, MissingFileError, user_errors
from mimzoo.eval.finetune import FineTune
from mimzoo.eval.knn import extract_features, knn_predict
from mimzoo.eval.linear import LinearProbe
from mimzoo.precision import apply_precision, device_type
from mimzoo.rundir import AtomicCheckpointIO, atomic_write, claim_run_dir, release_run_dir
from mimzoo.runs import CONFIG_DIR, build_loggers


def resolve_ckpt(cfg: DictConfig) -> Path:
    """The checkpoint to evaluate, with an error that says what to pass when it is missing."""
    hint = "pass ckpt=<mimzoo checkpoint>, e.g. ckpt=runs/<date>/<time>/checkpoints/last.ckpt"
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ConfigError(f"mimzoo-eval needs a checkpoint: {hint}")
    path = Path(str(cfg.ckpt)).expanduser().resolve()
    if not path.is_file():
        raise MissingFileError(f"ckpt={cfg.ckpt} is not a file; {hint}")
    return path


def load_backbone(path: Path):
    """:func:`load_pretrained` for evaluation: unreadable files, checkpoints of other kinds (a probe's, a
    fine-tune's) and stages without an encoder (the dVAE) are refused with what to pass instead."""
    return load_pretrained(path, purpose="evaluate")


def recipe(cfg: DictConfig) -> dict:
    """The protocol's keys minus its name: the module's constructor arguments."""
    keys = OmegaConf.to_container(cfg.protocol, resolve=True)
    keys.pop("name")
    return keys


def fit(cfg: DictConfig, module: L.LightningModule, datamodule, run_dir: Path) -> dict:
    """Train the probe or classifier, then report val top-1 of the final weights."""
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        monitor="val/top1",
        mode="max",
        save_last=True,
        enable_version_counter=False,
    )
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), LogIntervalFit()]
    precision = apply_precision(cfg.trainer, module)
    trainer = instantiate(
        cfg.trainer,
        precision=precision,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    best = checkpoint.best_model_score
    return dict(
        top1=float(final["val/top1"]),
        best_top1=float(best) if best is not None else None,
        val_loss=float(final["val/loss"]),
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        checkpoint=str(run_dir / "checkpoints" / "last.ckpt"),
        best_checkpoint=checkpoint.best_model_path,
    )


def run_linear(cfg, backbone, datamodule, run_dir) -> dict:
    with warnings.catch_warnings():  # Lightning warns of modules in eval mode: the frozen encoder, on purpose
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
        # The probe's checkpoints name the pre-trained checkpoint instead of carrying a copy of the frozen encoder.
        probe = LinearProbe(backbone, datamodule.num_classes, backbone_ckpt=str(resolve_ckpt(cfg)), **recipe(cfg))
        return fit(cfg, probe, datamodule, run_dir)


def run_finetune(cfg, backbone, datamodule, run_dir) -> dict:
    return fit(cfg, FineTune.from_pretrained(backbone, datamodule.num_classes, **recipe(cfg)), datamodule, run_dir)


def first_images(loader, limit: int | None):
    """The batches of an unshuffled loader up to ``limit`` images (the last batch cut); all when ``limit`` is None."""
    if limit is None:
        yield from loader
        return
    seen = 0
    for images, labels in loader:
        if seen >= limit:
            break
        take = min(len(labels), limit - seen)
        seen += take
        yield images[:take], labels[:take]


def run_knn(cfg, backbone, datamodule, run_dir) -> dict:
    """Weighted kNN: the training split (eval transform) is the bank, the val split the queries."""
    device = torch.device(device_type(cfg.trainer.accelerator))
    model = backbone.to(device).eval()
    quiet = not cfg.trainer.enable_progress_bar
    # The run's precision applies to the feature pass too (trainer.precision: auto -> bf16 where native); the
    # similarities are computed in fp32 from the normalised features.
    precision = apply_precision(cfg.trainer, model)
    bank_loader = first_images(datamodule.bank_dataloader(), cfg.protocol.get("max_bank"))
    query_loader = first_images(datamodule.val_dataloader(), cfg.protocol.get("max_queries"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
        bank, bank_y = extract_features(model, tqdm(bank_loader, "kNN bank", disable=quiet), device)
        queries, y = extract_features(model, tqdm(query_loader, "kNN queries", disable=quiet), device)
    k, temperature = cfg.protocol.k, cfg.protocol.temperature
    scores = knn_predict(bank, bank_y, queries, datamodule.num_classes, k, temperature)
    top1 = MulticlassAccuracy(datamodule.num_classes, average="micro")(scores, y).item()
    for logger in build_loggers(cfg, run_dir):
        logger.log_metrics({"val/top1": top1}, step=0)
        logger.finalize("success")
    return dict(
        top1=top1,
        epochs=0,
        k=k,
        temperature=temperature,
        bank_size=len(bank),
        num_queries=len(queries),
        precision=precision,
    )


PROTOCOLS = {"linear": run_linear, "finetune": run_finetune, "knn": run_knn}


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg.protocol`` on ``cfg.ckpt``; writes ``results.json`` into ``run_dir`` and returns it."""
    name = cfg.protocol.name
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    check_cpu_devices(cfg.trainer)
    lock = claim_run_dir(cfg, run_dir, "mimzoo-eval")  # one live evaluation per run directory
    ckpt = resolve_ckpt(cfg)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    backbone = load_backbone(ckpt)
    size = (cfg.data.image_size,) * 2
    if tuple(backbone.image_size) != size:
        raise ConfigError(
            f"{ckpt} was pre-trained on {tuple(backbone.image_size)} images but data.image_size="
            f"{cfg.data.image_size}; set data.image_size={backbone.image_size[0]}"
        )
    datamodule = instantiate(cfg.data)
    # Lightning logs the data's and the module's hparams together: both must name the same num_classes.
    datamodule = instantiate(cfg.data, num_classes=datamodule.num_classes)
    run_dir.mkdir(parents=True, exist_ok=True)
    outcome = PROTOCOLS[name](cfg, backbone, datamodule, run_dir)
    results = {
        "protocol": name,
        "ckpt": str(ckpt),
        "data": cfg.data.name,
        "num_classes": datamodule.num_classes,
        **outcome,
        "recipe": recipe(cfg),
        "run_dir": str(run_dir),
    }
    if rank_zero_only.rank == 0:
        out = run_dir / "results.json"
        atomic_write(out, lambda f: f.write(json.dumps(results, indent=2).encode()))  # whole, or not there
        print(f"\nmimzoo-eval: {name} top-1 = {100 * results['top1']:.2f}% (ckpt {ckpt}, results in {out})")
    release_run_dir(lock)
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    route_logs_to_job_log()
    with user_errors("mimzoo-eval"):
        return evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))["top1"]


def main():
    """``mimzoo-eval``: Hydra's command line, with ``ckpt=`` paths holding ``=`` quoted for it and bad input
    reported as one line (exit code 2)."""
    prepare_argv("mimzoo-eval")
    silence_unactionable_warnings()
    return hydra_main()


if __name__ == "__main__":
    main()
