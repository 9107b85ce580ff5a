"""Preemption (slow tier): a tiny MAE run sent SIGTERM mid-epoch (after step 6, batch 2 of 4 of epoch 1; the signal
goes to the whole process group, a loading worker included) saves last.ckpt at step 6, says so, exits 143, and
resumed with ckpt_path=last ends bit-identical to the uninterrupted run. Under SLURM (faked: its environment
variables and an ``scontrol`` that records its arguments), SIGUSR1 also requeues the job, and the requeued job,
started with the same command, resumes by itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from test_resume import COMMON, differences, load

HERE = Path(__file__).parent
OVERRIDES = [*TINY, *COMMON]
STEP = 6  # batch 2 of 4 of epoch 1


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cli):
    run = tmp_path_factory.mktemp("straight")
    cli("train", *OVERRIDES, f"hydra.run.dir={run}")
    return load(run / "checkpoints" / "last.ckpt")


def signalled_run(signame: str, run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The run of tests/signal_at_step.py, in a session of its own (so the signal reaches its group only)."""
    cmd = [sys.executable, str(HERE / "signal_at_step.py"), str(STEP), signame, *OVERRIDES, *extra,
           f"hydra.run.dir={run}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, start_new_session=True,
                          env={**os.environ, **(env or {})})


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
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mimzoo", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = tmp_path / "run"
    proc = signalled_run("SIGUSR1", run, env=slurm)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + 10, proc.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert f"received SIGUSR1: saved a checkpoint at step {STEP} to {ckpt}; requeued SLURM job 4242" in proc.stderr
    assert load(ckpt)["global_step"] == STEP
    # SLURM starts the requeued job with the same command (no ckpt_path) and SLURM_RESTART_COUNT=1
    requeued = subprocess.run([sys.executable, "-m", "mimzoo.train", *OVERRIDES, f"hydra.run.dir={run}"],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, **slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert_identical(straight, load(ckpt))
