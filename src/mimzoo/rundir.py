"""A run directory that can be trusted: one live run at a time (a lock), checkpoints written atomically
beside their target, the history kept on resume (``metrics.csv`` rows, the first launch's overrides), and a
resume that would change the experiment refused before anything is built.

What lands in a run directory besides Lightning's and Hydra's files:

- ``mimzoo.lock``: pid, host, start time and command of the live run (:mod:`mimzoo.runlock`).
- ``.hydra/mimzoo/``: ``launches.yaml`` (every launch: time, host, overrides, the changes a resume was
  allowed), ``resolved.yaml`` (the resolved config the checkpoints follow) and copies of Hydra's
  ``config.yaml``/``hydra.yaml`` of the last accepted launch (put back when a launch is refused).
- temp files ``.<name>.mimzoo-tmp-<pid>`` only while a write is under way.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from mimzoo.runlock import RunDirRefused, RunLock, launch_rank_zero, now

log = logging.getLogger("mimzoo")

TEMP_MARK = ".mimzoo-tmp-"


# --- atomic writes ------------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """The temp file of a write to ``path``: beside it (same directory, so same filesystem, so
    :func:`os.replace` is an atomic rename), hidden, named after this process."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def atomic_write(path, write) -> None:
    """``write(file)`` into a temp file beside ``path``, flushed to disk, then renamed over ``path``:
    ``path`` is either the old file or the whole new one, never a part. The temp file is removed on any
    error (and on KeyboardInterrupt/SystemExit); a SIGKILL can leave it, :func:`clean_stale_temp_files`
    removes it when the run directory is next claimed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (best effort: not every filesystem allows opening a directory)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove temp files of our naming left in ``run_dir`` and ``run_dir/checkpoints`` by a killed write.
    Call with the run directory's lock held: then no write of ours is under way there."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for stale in folder.glob(f".*{TEMP_MARK}*") if folder.is_dir() else ():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    if removed:
        log.warning(
            "mimzoo: removed %d temp file(s) left by an interrupted write: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local saves through :func:`atomic_torch_save`.

    Lightning's own ``_atomic_save`` writes through an fsspec transaction, whose local temp file comes from
    ``tempfile.mkstemp()`` (``$TMPDIR``) and is then ``shutil.move``-d over the target: across filesystems that
    is a copy into the open target, so a kill mid-copy leaves a truncated checkpoint and the whole temp file
    behind. Here the temp file sits beside the target and is renamed. Remote URLs (``s3://``...) keep
    Lightning's path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or ("://" in str(path) and not str(path).startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` and no other file, written at the triggers (every N epochs or steps) where
    ``ModelCheckpoint(save_top_k=1, save_last=True)`` writes its top-1 file *and* ``last.ckpt``. Lightning's own
    ``save_top_k=0`` is no way to get this: at an epoch end it writes ``last.ckpt`` only when a top-k file was
    written at the same step, so only at the end of training. (Overrides two private ``ModelCheckpoint``
    methods; ``tests/test_runsafe.py`` checks ``last.ckpt`` after each epoch.)"""

    def __init__(self, dirpath: str, every_n_epochs: int | None = None, every_n_train_steps: int | None = None):
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        self._save_last_checkpoint(trainer, monitor_candidates)  # the top-k slot is last.ckpt itself

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._last_checkpoint_saved and self._last_global_step_saved == trainer.global_step:
            return  # written at this step already (by the call above)
        super()._save_last_checkpoint(trainer, monitor_candidates)


class KeptCheckpoints(ModelCheckpoint):
    """Every N epochs or steps, a checkpoint that is kept (``epoch<E>-step<S>.ckpt``: no ``=`` in the name, so it
    can be passed as a Hydra override as it is)."""

    def __init__(self, dirpath: str, every_n_epochs: int | None = None, every_n_train_steps: int | None = None):
        super().__init__(
            dirpath=dirpath,
            filename="epoch{epoch}-step{step}",
            auto_insert_metric_name=False,
            save_top_k=-1,
            save_last=False,
            every_n_epochs=every_n_epochs or 0,
            every_n_train_steps=every_n_train_steps or 0,
            enable_version_counter=False,
        )


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[ModelCheckpoint]:
    """``last.ckpt`` (every ``checkpoint.every_n_epochs`` / ``every_n_train_steps``); one kept checkpoint every
    ``checkpoint.keep_every_n_epochs`` / ``keep_every_n_steps`` when set; the best ``checkpoint.save_top_k`` by
    ``checkpoint.monitor`` when ``save_top_k`` is not 0. By default: ``last.ckpt`` alone."""
    c = cfg.checkpoint
    callbacks = [LastCheckpoint(str(ckpt_dir), c.every_n_epochs, c.every_n_train_steps)]
    if c.get("keep_every_n_epochs"):
        callbacks.append(KeptCheckpoints(str(ckpt_dir), every_n_epochs=c.keep_every_n_epochs))
    if c.get("keep_every_n_steps"):
        callbacks.append(KeptCheckpoints(str(ckpt_dir), every_n_train_steps=c.keep_every_n_steps))
    if c.save_top_k:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename="best-epoch{epoch}-step{step}",
                auto_insert_metric_name=False,
                monitor=c.monitor,
                save_top_k=c.save_top_k,
                every_n_epochs=c.every_n_epochs,
                every_n_train_steps=c.every_n_train_steps,
                enable_version_counter=False,
            )
        )
    return callbacks


# --- metrics.csv: history kept on resume -------------------------------------------------------------
class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it never deletes ``metrics.csv``: a resume appends to it under the
    existing header (new columns rewrite it, atomically, with every old row), a fresh run moves an old file
    aside to ``metrics-<time>.csv``."""

    def __init__(self, log_dir: str, resume: bool):
        self.resume = resume
        super().__init__(log_dir=log_dir)
        self.rows = 0  # rows in metrics.csv, written or buffered
        if resume and os.path.isfile(self.metrics_file_path):
            header, rows = self._read()
            self.metrics_keys = sorted(header)
            self.rows = len(rows)
            if header != self.metrics_keys:  # keep the sorted-header invariant Lightning's writer relies on
                self._write(self.metrics_keys, rows)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv (and warns on any non-empty dir)
        path = Path(self.metrics_file_path)
        if not self.resume and path.is_file():
            aside = path.with_name(f"metrics-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv")
            os.replace(path, aside)
            log.warning(
                "mimzoo: %s holds a metrics.csv of an earlier run and this run is not a resume "
                "(no ckpt_path): moved it to %s",
                path.parent,
                aside.name,
            )

    def _read(self) -> tuple[list[str], list[dict]]:
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _write(self, fieldnames: list[str], rows: list[dict]) -> None:
        def write(f):
            text = io.TextIOWrapper(f, newline="", encoding="utf-8")
            writer = csv.DictWriter(text, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            text.flush()
            text.detach()

        atomic_write(self.metrics_file_path, write)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write(fieldnames, self._read()[1])

    def log_metrics(self, metrics_dict, step=None) -> None:
        super().log_metrics(metrics_dict, step)
        self.rows += 1

    def keep_rows(self, n: int) -> None:
        """Keep the first ``n`` rows: those a checkpoint covers; later ones will be logged again by the resume."""
        self.save()
        if not os.path.isfile(self.metrics_file_path):
            return
        header, rows = self._read()
        if len(rows) > n:
            self._write(header, rows[:n])
            log.info(
                "mimzoo: metrics.csv: kept the %d rows the checkpoint covers, dropped %d logged after it",
                n,
                len(rows) - n,
            )
        self.rows = min(n, len(rows))


class HistoryCSVLogger(CSVLogger):
    """``metrics.csv`` in the run directory, kept across resumes (see :class:`_HistoryWriter`)."""

    def __init__(self, save_dir: str, resume: bool = False):
        super().__init__(save_dir=save_dir, name="", version="")
        self.resume = resume

    @property
    @rank_zero_experiment  # ranks > 0 get a dummy, as with Lightning's CSVLogger: only rank 0 touches the file
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir, resume=self.resume)
        return self._experiment


class MetricsHistory(Callback):
    """Stores in each checkpoint how many ``metrics.csv`` rows it covers (flushing them first), so that a resume
    from it keeps exactly those rows: rows logged after the checkpoint by the interrupted run are logged again by
    the resume, and are dropped instead of doubled."""

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def _writer(self) -> _HistoryWriter | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return None
        logger = next((lg for lg in trainer.loggers if isinstance(lg, HistoryCSVLogger)), None)
        return logger.experiment if logger is not None else None

    def state_dict(self) -> dict:
        writer = self._writer()
        if writer is None:
            return {}
        writer.save()
        return {"metrics_rows": writer.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        writer = self._writer()
        if writer is not None and "metrics_rows" in state_dict:
            writer.keep_rows(int(state_dict["metrics_rows"]))


# --- the first launch kept, resumes that change the experiment refused -------------------------------
# Keys whose change on resume changes the experiment (prefixes: "model" is every model.* key) ...
GUARDED = (
    "model",
    "mask",
    "optim",
    "data",
    "seed",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.precision",
    "trainer.limit_train_batches",
)
# ... except these, which change how the same experiment runs. Anything else (trainer.max_epochs/max_steps to
# extend a run, trainer.devices, logger, checkpoint, recon, probe, compile) may change freely.
NOT_GUARDED = ("data.num_workers", "data.download", "data.memory_limit_gb")
ALLOW_KEY = "resume_allow_changes"
MISSING = "<absent>"


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(node, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def experiment_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{key: (old, new)}`` for every guarded key whose resolved value differs (``<absent>`` on one side)."""
    a, b = _flatten(old), _flatten(new)
    changes = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if va != vb and _matches(key, GUARDED) and not _matches(key, NOT_GUARDED):
            changes[key] = (va, vb)
    return changes


def _allowed(cfg: DictConfig) -> bool | list[str]:
    allow = cfg.get(ALLOW_KEY, False)
    if isinstance(allow, (list, ListConfig)):
        return [str(k) for k in allow]
    if isinstance(allow, str):
        return [allow]
    return bool(allow)


class RunRecord:
    """``<run_dir>/.hydra/mimzoo/``: what this run was launched with (see the module docstring)."""

    HYDRA_FILES = ("config.yaml", "hydra.yaml")

    def __init__(self, run_dir: Path, tool: str):
        self.run_dir = Path(run_dir)
        self.hydra_dir = self.run_dir / ".hydra"
        self.dir = self.hydra_dir / "mimzoo"
        self.tool = tool

    def _launch_overrides(self) -> list[str]:
        """This launch's overrides: what Hydra has just written to ``.hydra/overrides.yaml`` (else its runtime)."""
        path = self.hydra_dir / "overrides.yaml"
        if path.is_file():
            return [str(o) for o in yaml.safe_load(path.read_text()) or []]
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []

    def launches(self) -> list[dict]:
        path = self.dir / "launches.yaml"
        return (yaml.safe_load(path.read_text()) or []) if path.is_file() else []

    def restore_overrides(self) -> None:
        """Put back the first launch's ``.hydra/overrides.yaml``, which Hydra rewrites at every launch."""
        first = next(iter(self.launches()), None)
        if first is not None and not first.get("resume"):
            self._write_yaml(self.hydra_dir / "overrides.yaml", first["overrides"])

    def restore_hydra_files(self) -> None:
        """Undo what Hydra wrote for a refused launch: the first overrides, the last accepted config."""
        self.restore_overrides()
        for name in self.HYDRA_FILES:
            if (self.dir / name).is_file():
                shutil.copyfile(self.dir / name, self.hydra_dir / name)

    def _write_yaml(self, path: Path, data) -> None:
        atomic_write(path, lambda f: f.write(yaml.safe_dump(data, sort_keys=False).encode()))

    def accept(self, cfg: DictConfig, resume: bool) -> dict[str, tuple]:
        """Check a launch against the record and record it; refuses a resume that changes the experiment."""
        overrides = self._launch_overrides()
        try:
            resolved = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation only Hydra's runtime resolves: compare the values as written
            resolved = OmegaConf.to_container(cfg, resolve=False)
        changes: dict[str, tuple] = {}
        baseline = self.dir / "resolved.yaml"
        if resume and baseline.is_file():
            changes = experiment_changes(yaml.safe_load(baseline.read_text()) or {}, resolved)
            allow = _allowed(cfg)
            refused = {} if allow is True else {k: v for k, v in changes.items() if not (allow and _matches(k, allow))}
            if refused:
                self.restore_hydra_files()
                raise RunDirRefused(self._refusal(refused))
            if changes:
                log.warning(
                    "mimzoo: resuming with changes to the experiment, allowed by %s: %s",
                    ALLOW_KEY,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
                )
        elif resume and (self.run_dir / "checkpoints").is_dir():
            log.warning(
                "mimzoo: %s has no record of its first launch (started before mimzoo kept one): the "
                "overrides of this resume are not checked against it",
                self.run_dir,
            )
        launches = self.launches() if resume else []  # a fresh run in a used directory starts a new record
        launches.append(
            {
                "time": now(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "tool": self.tool,
                "resume": cfg.get("ckpt_path") if resume else None,
                "overrides": overrides,
                "changes": {k: [a, b] for k, (a, b) in changes.items()},
            }
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_yaml(self.dir / "launches.yaml", launches)
        self._write_yaml(baseline, resolved)
        if resume:
            self.restore_overrides()
        for name in self.HYDRA_FILES:  # this launch's config is now the accepted one
            if (self.hydra_dir / name).is_file():
                shutil.copyfile(self.hydra_dir / name, self.dir / name)
        return changes

    def _refusal(self, refused: dict) -> str:
        first = next(iter(self.launches()), {})
        lines = [
            f"{self.tool}: error: refusing to resume {self.run_dir}: these overrides change the experiment "
            "its checkpoint was trained with:"
        ]
        lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items()]
        keys = ",".join(refused)
        lines += [
            f"The run was launched with: {' '.join(first.get('overrides') or []) or '(no overrides)'} "
            f"(.hydra/overrides.yaml). Resume with the same values, start a new run in another directory, "
            f"or allow the change on purpose: {ALLOW_KEY}=[{keys}] (or {ALLOW_KEY}=true for any key)."
        ]
        return "\n".join(lines)


# --- claiming a run directory ---------------------------------------------------------------------------
def claim_run_dir(cfg: DictConfig, run_dir: Path, tool: str, resume: bool = False) -> RunLock | None:
    """Before anything is built: lock ``run_dir`` (refused if a live run holds it), remove temp files a killed
    write left, and check and record this launch (:class:`RunRecord`). Returns the lock (None on ranks > 0,
    which run inside the launching process's claim); release it with :func:`release_run_dir`."""
    if not launch_rank_zero():
        return None
    run_dir = Path(run_dir)
    record = RunRecord(run_dir, tool)
    try:
        lock = RunLock(run_dir, tool).acquire()
    except RunDirRefused:
        record.restore_hydra_files()
        raise
    try:
        clean_stale_temp_files(run_dir)
        record.accept(cfg, resume)
    except BaseException:
        lock.release()
        raise
    return lock


def release_run_dir(lock: RunLock | None) -> None:
    if lock is not None:
        lock.release()
