"""A run directory that can be trusted: one live run at a time (a lock) and checkpoints written atomically
beside their target.

What lands in a run directory besides Lightning's and Hydra's files:

- ``mimzoo.lock``: pid, host, start time and command of the live run (:mod:`mimzoo.runlock`).
- temp files ``.<name>.mimzoo-tmp-<pid>`` only while a write is under way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from mimzoo.runlock import RunLock, launch_rank_zero

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
        log.warning("mimzoo: removed %d temp file(s) left by an interrupted write: %s", len(removed),
                    ", ".join(p.name for p in removed))
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
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_epochs=every_n_epochs,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

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
        super().__init__(dirpath=dirpath, filename="epoch{epoch}-step{step}", auto_insert_metric_name=False,
                         save_top_k=-1, save_last=False, every_n_epochs=every_n_epochs or 0,
                         every_n_train_steps=every_n_train_steps or 0, enable_version_counter=False)


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
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best-epoch{epoch}-step{step}",
                                         auto_insert_metric_name=False, monitor=c.monitor, save_top_k=c.save_top_k,
                                         every_n_epochs=c.every_n_epochs, every_n_train_steps=c.every_n_train_steps,
                                         enable_version_counter=False))
    return callbacks


# --- claiming a run directory ---------------------------------------------------------------------------
def claim_run_dir(cfg: DictConfig, run_dir: Path, tool: str) -> RunLock | None:
    """Before anything is built: lock ``run_dir`` (refused if a live run holds it) and remove temp files a killed
    write left. Returns the lock (None on ranks > 0, which run inside the launching process's claim); release it
    with :func:`release_run_dir`."""
    if not launch_rank_zero():
        return None
    run_dir = Path(run_dir)
    lock = RunLock(run_dir, tool).acquire()
    clean_stale_temp_files(run_dir)
    return lock


def release_run_dir(lock: RunLock | None) -> None:
    if lock is not None:
        lock.release()
