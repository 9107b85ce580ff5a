"""Run directories that can be trusted: atomic checkpoints on any filesystem layout and no temp files left,
only ``last.ckpt`` by default, linear-probe checkpoints without the frozen encoder, one live run per directory."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mimzoo import evaluate as ev
from mimzoo.eval.linear import LinearProbe
from mimzoo.methods import MAE
from mimzoo.rundir import AtomicCheckpointIO, checkpoint_callbacks, claim_run_dir, release_run_dir
from mimzoo.runlock import RunDirRefused, RunLock
from mimzoo.train import CONFIG_DIR

from conftest import REPO, TINY, TINY_MAE


def compose_train(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# --- atomic checkpoints ----------------------------------------------------------------------------
def _state(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "epoch": int(value)}


def test_save_with_tmpdir_elsewhere_writes_beside_the_target(tmp_path, monkeypatch):
    """$TMPDIR on another directory (tmpfs when there is one, as on a cluster node): nothing is written there,
    no cross-directory move happens (across filesystems that is a copy into the open target), no temp file stays."""
    shm = Path("/dev/shm")
    other = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path))
    try:
        monkeypatch.setenv("TMPDIR", str(other))
        monkeypatch.setattr(tempfile, "tempdir", str(other))

        def no_move(*args, **kwargs):
            raise AssertionError(f"shutil.move{args}: the checkpoint went through a temp file away from its target")

        monkeypatch.setattr(shutil, "move", no_move)
        target = tmp_path / "run" / "checkpoints" / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint(_state(1.0), target)
        assert os.listdir(other) == []
        assert os.listdir(target.parent) == ["last.ckpt"]
        assert torch.equal(torch.load(target)["state_dict"]["w"], torch.full((256, 256), 1.0))
    finally:
        shutil.rmtree(other)


def test_crash_mid_write_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_state(1.0), target)
    real_save = torch.save

    def killed_half_way(obj, f, *args, **kwargs):  # writes part of the checkpoint, then "the process dies"
        real_save(obj, buffer := __import__("io").BytesIO())
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_state(2.0), target)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(target.parent) == ["last.ckpt"]
    assert torch.load(target)["epoch"] == 1  # the previous checkpoint, whole


def test_temp_files_left_by_a_killed_write_are_removed_when_the_run_dir_is_claimed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    stale = [ckpts / ".last.ckpt.mimzoo-tmp-12345", tmp_path / ".metrics.csv.mimzoo-tmp-99"]
    kept = [ckpts / "last.ckpt", ckpts / "epoch3-step40.ckpt", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    lock = claim_run_dir(OmegaConf.create({"ckpt_path": None}), tmp_path, "mimzoo-train")
    release_run_dir(lock)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


class LastAtEpochStart(L.Callback):
    """Records the step of ``last.ckpt`` at the start of each epoch (0 for none)."""

    def __init__(self, path: Path):
        self.path, self.steps = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        exists = self.path.is_file()
        self.steps.append(torch.load(self.path, weights_only=False)["global_step"] if exists else 0)


def _fit_tiny_mae(tmp_path, *overrides, epochs=3):
    cfg = compose_train(*TINY, *overrides)
    torch.manual_seed(0)
    seen = LastAtEpochStart(tmp_path / "last.ckpt")
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*checkpoint_callbacks(cfg, tmp_path), seen], plugins=[AtomicCheckpointIO()])
    from mimzoo.data import MIMDataModule

    trainer.fit(MAE(**TINY_MAE), datamodule=MIMDataModule("fake", batch_size=8, num_workers=0))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    return sorted(os.listdir(tmp_path)), seen.steps


def test_only_last_ckpt_by_default_and_every_n_when_asked(tmp_path):
    files, steps = _fit_tiny_mae(tmp_path / "default")
    assert files == ["last.ckpt"] and steps == [0, 1, 2]  # rewritten at every epoch end, not only at the end
    files, steps = _fit_tiny_mae(tmp_path / "kept", "checkpoint.keep_every_n_epochs=2")
    assert files == ["epoch1-step2.ckpt", "last.ckpt"] and steps == [0, 1, 2]
    assert torch.load(tmp_path / "kept" / "epoch1-step2.ckpt", weights_only=False)["global_step"] == 2
    assert torch.load(tmp_path / "kept" / "last.ckpt", weights_only=False)["global_step"] == 3


# --- linear-probe checkpoints ------------------------------------------------------------------------
@pytest.fixture
def pretrained(tmp_path):
    """A mimzoo checkpoint of a tiny MAE, written the way mimzoo-import writes one."""
    torch.manual_seed(0)
    model = MAE(**TINY_MAE)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__}
    model.on_save_checkpoint(ckpt)
    path = tmp_path / "pretrain" / "last.ckpt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


def test_linear_probe_checkpoint_holds_the_head_not_the_encoder(pretrained, tmp_path):
    with initialize_config_dir(config_dir=ev.CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["protocol=linear", f"ckpt={pretrained}", "data=cifar10_mini",
                                         "data.num_workers=0", "logger=csv", "trainer.accelerator=cpu",
                                         "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"])
    run_dir = tmp_path / "linear"
    ev.evaluate(cfg, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("backbone.")]
    assert set(saved["state_dict"]) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                                        "head.1.weight", "head.1.bias"}
    assert saved["linear_probe"]["backbone_ckpt"] == str(pretrained)
    assert last.stat().st_size < pretrained.stat().st_size / 4
    # Rebuilt from both files: the encoder of the pre-trained checkpoint, the trained head, the same outputs.
    probe = LinearProbe.from_checkpoint(last).eval()
    encoder = MAE.load_from_checkpoint(pretrained).state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in probe.backbone.state_dict().items())
    assert all(torch.equal(v, saved["state_dict"][f"head.{k}"]) for k, v in probe.head.state_dict().items())
    images = torch.randn(4, 3, 32, 32)
    assert probe(images).shape == (4, 10)
    # A pre-trained checkpoint overwritten since (a longer run's last.ckpt) is refused, not silently used.
    changed = torch.load(pretrained, weights_only=False)
    changed["state_dict"]["encoder.cls_token"] += 1
    torch.save(changed, pretrained)
    with pytest.raises(ValueError, match="not the one the probe"):
        LinearProbe.from_checkpoint(last)


# --- one live run per directory -------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from mimzoo.runlock import RunLock
RunLock(Path(sys.argv[1]), "holder").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_live_run_and_takes_over_a_dead_ones(tmp_path, caplog):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(RunDirRefused) as refused:
            RunLock(tmp_path, "mimzoo-train").acquire()
        message = str(refused.value)
        assert f"is in use by another live run (pid {holder.pid} on host {socket.gethostname()}" in message
        assert "hydra.run.dir=<new dir>" in message and str(tmp_path / "mimzoo.lock") in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without cleaning up: its lock file stays behind
        holder.wait()
    assert (tmp_path / "mimzoo.lock").exists()
    with caplog.at_level("WARNING", logger="mimzoo"):
        lock = RunLock(tmp_path, "mimzoo-train").acquire()
    assert f"taking over the lock of a run that is no longer running (pid {holder.pid}" in caplog.text
    assert yaml.safe_load((tmp_path / "mimzoo.lock").read_text())["pid"] == os.getpid()
    assert RunLock(tmp_path, "mimzoo-train").acquire() is lock  # a sweep's next job in this process re-enters
    lock.release()
    assert not (tmp_path / "mimzoo.lock").exists()


# --- end to end through mimzoo-train / mimzoo-eval ----------------------------------------------------------
@pytest.mark.slow
def test_second_run_in_a_live_run_dir_is_refused(tmp_path, cli):
    """A real mimzoo-train holds the directory; a second mimzoo-train and a mimzoo-eval there are refused with
    the holder's pid, and the holder's files are untouched; once it is killed, the next run takes over."""
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-m", "mimzoo.train", *TINY, "trainer.max_epochs=100000", "logger=csv",
                              "probe.knn.enabled=false", "recon.enabled=false", "trainer.limit_val_batches=0",
                              f"hydra.run.dir={run}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while not (run / "mimzoo.lock").exists() or f"pid: {first.pid}\n" not in (run / "mimzoo.lock").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        second = cli("train", *TINY, "trainer.max_steps=1", "logger=csv", "seed=1", f"hydra.run.dir={run}",
                     expect_ok=False)
        assert f"is in use by another live run (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None  # the first run goes on
        evaluation = cli("evaluate", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "logger=csv", f"hydra.run.dir={run}",
                         expect_ok=False)
        assert f"mimzoo-eval: error: {run} is in use by another live run (pid {first.pid}" in evaluation.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = cli("train", *TINY, "trainer.max_steps=1", "logger=csv", "probe.knn.enabled=false", "recon.enabled=false",
                f"hydra.run.dir={run}")
    assert f"taking over the lock of a run that is no longer running (pid {first.pid}" in third.stdout + third.stderr
    assert not (run / "mimzoo.lock").exists()
