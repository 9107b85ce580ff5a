"""Preemption: on SIGTERM or SIGUSR1 a run saves ``checkpoints/last.ckpt`` at the current step, says so on
stderr and exits with ``128 + signal`` (143, 138); under SLURM, SIGUSR1 (which ``hydra/launcher=slurm`` asks the
scheduler to send ``signal_delay_s`` before the time limit) also requeues the job, and the requeued job resumes
from that checkpoint by itself (:func:`requeued_ckpt_path`).

Why not Lightning's own handling: on SIGTERM it exits with status 0 and saves nothing, and its SLURM auto-requeue
saves ``hpc_ckpt_<n>.ckpt`` from inside the signal handler, at whatever instruction training was at (between the
optimiser step and the step counter, say), which no resume reproduces exactly. Here the signal only sets a flag;
the run stops at the next optimiser-step boundary, or at the end of the epoch (after its validation) when the
signal lands in the epoch's last step or its validation, through Lightning's own SIGTERM exit, and the checkpoint
is written there: a state the uninterrupted run passes through, so the resumed run ends bit-identical to it
(tests/test_preemption.py). Under DDP every rank stops at the same step (one boolean all-reduce per step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def cluster_plugins() -> list:
    """Under a SLURM batch job, Lightning's SLURM environment without its own requeue (this module's does it)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def requeued_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` as given, except that a job SLURM has requeued
    (``SLURM_RESTART_COUNT`` > 0) resumes by itself (``last``, when it saved a checkpoint before), and that
    ``last`` means the newest of ``checkpoints/last.ckpt`` and Lightning's ``hpc_ckpt_<n>.ckpt`` in the run
    directory (its path when that is an ``hpc_ckpt``)."""
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if ckpt_path is None and candidates and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        ckpt_path = "last"
    if ckpt_path != "last" or not candidates:
        return ckpt_path
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    return "last" if newest.name == "last.ckpt" else str(newest)


class Preemption(L.Callback):
    """Stop on SIGTERM/SIGUSR1 at the next step boundary with a checkpoint at ``ckpt_path`` (see the module
    docstring); requeue under SLURM on SIGUSR1. Also keeps the checkpoint of a run that ``trainer.max_steps`` stops
    mid-epoch resumable mid-epoch (:meth:`on_save_checkpoint`)."""

    def __init__(self, ckpt_path: str | Path):
        self.ckpt_path = Path(ckpt_path)
        self.signum: int | None = None
        self._trainer = None
        self._stopping = False
        self._previous: dict = {}  # the handlers ours replaced, put back when training ends

    # --- signals ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        """Ours replace Lightning's (a SIGTERM before this, during set-up, goes Lightning's way: it stops the run
        at its first step's end, and :meth:`on_exception` saves there all the same)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        while self._previous:
            signum, handler = self._previous.popitem()
            if handler is not None:  # None: not installed from Python, nothing to put back
                signal.signal(signum, handler)

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def teardown(self, trainer, pl_module, stage):
        self._restore()

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # the ranks this process started (trainer=ddp on one machine)

    # --- where to stop ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = batch_idx + 1 >= trainer.num_training_batches  # stop after the epoch's validation instead
        if not last and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._maybe_stop(trainer, finishing=0 < trainer.max_steps <= trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_stop(
            trainer,
            finishing=(
                0 < trainer.max_steps <= trainer.global_step
                or 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
            ),
        )

    def _maybe_stop(self, trainer, finishing: bool) -> None:
        """``finishing``: the run ends here anyway (max_steps, max_epochs) and is left to end normally."""
        if self._stopping or finishing:
            return
        pending = self.signum is not None
        if trainer.world_size > 1:  # every rank stops at the same step
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            self._stopping = True
            # Lightning's own SIGTERM exit: SIGTERMException once this step's (or epoch's) hooks are done
            trainer._signal_connector.received_sigterm = True

    # --- the checkpoint and the exit ----------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        """A run that ``trainer.max_steps`` stops mid-epoch still runs its epoch-end hooks, and a checkpoint saved
        there reads to Lightning as a finished epoch: resumed, it would skip the epoch's remaining batches. Mark
        the epoch as not finished, so the resume carries on with them, as the uninterrupted run does."""
        if not 0 < trainer.max_steps <= trainer.global_step:
            return
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
        if not epochs or not batches or batches["current"]["processed"] >= trainer.num_training_batches:
            return
        for part in ("current", "total"):
            epochs[part]["processed"] = min(epochs[part]["processed"], epochs[part]["completed"])

    def on_exception(self, trainer, pl_module, exception):
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or signal.SIGTERM  # None: Lightning's handler took it, before on_train_start
        trainer.save_checkpoint(self.ckpt_path)
        name = signal.Signals(self.signum).name
        job = slurm_job_id() if self.signum == REQUEUE_SIGNAL and SLURMEnvironment.detect() else None
        requeued = trainer.is_global_zero and job is not None and self._requeue(job)
        if trainer.is_global_zero:
            if requeued:
                then = f"requeued SLURM job {job}, which resumes from it"
            else:
                failed = f"could not requeue SLURM job {job} (scontrol requeue failed); " if job else ""
                run_dir = self.ckpt_path.parent.parent
                then = f"{failed}resume with: mimzoo-train <the same overrides> hydra.run.dir={run_dir} ckpt_path=last"
            print(
                f"mimzoo: received {name}: saved a checkpoint at step {trainer.global_step} to {self.ckpt_path}; "
                f"{then}",
                file=sys.stderr,
                flush=True,
            )
        exception.code = 128 + self.signum  # not 0: the run did not finish

    @staticmethod
    def _requeue(job: str) -> bool:
        try:
            return subprocess.run(["scontrol", "requeue", job], timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
