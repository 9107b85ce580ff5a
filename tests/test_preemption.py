"""Preemption. In process (fast): SIGTERM at step 3 stops fit() there with a checkpoint, a line on stderr and
SystemExit(143), and puts the signal handlers back. Slow tier, through the CLI: a tiny MAE run sent SIGTERM
mid-epoch (after step 6, batch 2 of 4 of epoch 1; to the whole process group, a loading worker included) saves
last.ckpt at step 6, says so, exits 143, and resumed with ckpt_path=last ends bit-identical to the uninterrupted
run; the same on two DDP ranks; under SLURM (faked: its environment variables and an ``scontrol`` that records
its arguments), SIGUSR1 also requeues the job, and the requeued job, started with the same command, resumes by
itself."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY, TINY_MAE
from mimzoo.callbacks.preemption import Preemption
from mimzoo.data import MIMDataModule
from mimzoo.methods import MAE
from test_resume import COMMON, differences, load

HERE = Path(__file__).parent
OVERRIDES = [*TINY, *COMMON]
STEP = 6  # batch 2 of 4 of epoch 1


def test_sigterm_stops_at_the_step_with_a_checkpoint_and_status_143(tmp_path, capsys):
    class SigtermAtStep3(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(0)
    model = MAE(**TINY_MAE, optim={"lr": 1e-3})
    dm = MIMDataModule("cifar10-mini", batch_size=32, num_workers=0, train_aug="none")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    before = signal.getsignal(signal.SIGTERM)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SigtermAtStep3(), Preemption(ckpt)],
    )
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(model, datamodule=dm)
    assert stopped.value.code == 128 + 15
    assert load(ckpt)["global_step"] == 3
    assert f"received SIGTERM: saved a checkpoint at step 3 to {ckpt}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cli):
    run = tmp_path_factory.mktemp("straight")
    cli("train", *OVERRIDES, f"hydra.run.dir={run}")
    return load(run / "checkpoints" / "last.ckpt")


def signalled_run(signame: str, run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The run of tests/signal_at_step.py, in a session of its own (so the signal reaches its group only)."""
    cmd = [sys.executable, str(HERE / "signal_at_step.py"), *OVERRIDES, *extra, f"hydra.run.dir={run}"]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        start_new_session=True,
        env={**os.environ, "MIMZOO_SIGNAL_AT": f"{STEP}:{signame}", **(env or {})},
    )


def assert_identical(reference: dict, resumed: dict) -> None:
    diff = differences(reference, resumed)
    assert all(v == 0 for v in diff.values()), f"resumed run differs from the uninterrupted one: {diff}"


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_nonzero_and_resumes_bit_identical(straight, tmp_path, cli):
    run = tmp_path / "run"
    proc = signalled_run("SIGTERM", run, "data.num_workers=1")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert f"received SIGTERM: saved a checkpoint at step {STEP} to {ckpt}" in proc.stderr
    assert f"hydra.run.dir={run} ckpt_path=last" in proc.stderr
    saved = load(ckpt)
    assert saved["global_step"] == STEP and saved["epoch"] == 1
    cli("train", *OVERRIDES, "data.num_workers=1", f"hydra.run.dir={run}", "ckpt_path=last")
    assert_identical(straight, load(ckpt))


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_and_the_requeued_job_resumes_bit_identical(straight, tmp_path, cli):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "mimzoo",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    run = tmp_path / "run"
    proc = signalled_run("SIGUSR1", run, env=slurm)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + 10, proc.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert f"received SIGUSR1: saved a checkpoint at step {STEP} to {ckpt}; requeued SLURM job 4242" in proc.stderr
    assert load(ckpt)["global_step"] == STEP
    # SLURM starts the requeued job with the same command (no ckpt_path) and SLURM_RESTART_COUNT=1
    requeued = subprocess.run(
        [sys.executable, "-m", "mimzoo.train", *OVERRIDES, f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **slurm, "SLURM_RESTART_COUNT": "1"},
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert_identical(straight, load(ckpt))


@pytest.mark.slow
def test_sigterm_under_ddp_stops_both_ranks_at_the_same_step_and_resumes_bit_identical(tmp_path, cli, monkeypatch):
    """Two gloo ranks on CPU (Lightning starts rank 1 with the same script): every rank stops at step 6 (one boolean
    all-reduce per step), the checkpoint is saved once, and the resumed run ends as the uninterrupted one."""
    monkeypatch.setenv("PL_TORCH_DISTRIBUTED_BACKEND", "gloo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=32"]
    cli("train", *OVERRIDES, *ddp, f"hydra.run.dir={tmp_path / 'straight'}")
    run = tmp_path / "run"
    proc = signalled_run("SIGTERM", run, *ddp)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert proc.stderr.count(f"received SIGTERM: saved a checkpoint at step {STEP} to {ckpt}") == 1  # rank 0 says so
    assert load(ckpt)["global_step"] == STEP
    cli("train", *OVERRIDES, *ddp, f"hydra.run.dir={run}", "ckpt_path=last")
    assert_identical(load(tmp_path / "straight" / "checkpoints" / "last.ckpt"), load(ckpt))
