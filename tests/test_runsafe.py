"""Run directories that can be trusted: atomic checkpoints on any filesystem layout and no temp files left,
only ``last.ckpt`` by default, linear-probe checkpoints without the frozen encoder, ``metrics.csv`` and the first
overrides kept on resume, a resume that changes the experiment refused, one live run per directory."""

import csv
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

from conftest import REPO, TINY, TINY_MAE
from mimzoo import evaluate as ev
from mimzoo.eval.linear import LinearProbe
from mimzoo.methods import MAE
from mimzoo.rundir import (
    AtomicCheckpointIO,
    HistoryCSVLogger,
    LastCheckpoint,
    MetricsHistory,
    RunRecord,
    checkpoint_callbacks,
    claim_run_dir,
    experiment_changes,
    release_run_dir,
)
from mimzoo.runlock import RunDirRefused, RunLock
from mimzoo.train import CONFIG_DIR


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
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*checkpoint_callbacks(cfg, tmp_path), seen],
        plugins=[AtomicCheckpointIO()],
    )
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
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    model.on_save_checkpoint(ckpt)
    path = tmp_path / "pretrain" / "last.ckpt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


def test_linear_probe_checkpoint_holds_the_head_not_the_encoder(pretrained, tmp_path):
    with initialize_config_dir(config_dir=ev.CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                "protocol=linear",
                f"ckpt={pretrained}",
                "data=cifar10_mini",
                "data.num_workers=0",
                "logger=csv",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=1",
            ],
        )
    run_dir = tmp_path / "linear"
    ev.evaluate(cfg, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("backbone.")]
    assert set(saved["state_dict"]) == {
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
        "head.1.weight",
        "head.1.bias",
    }
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


# --- metrics.csv kept on resume -----------------------------------------------------------------------
def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_csv_history_appends_on_resume_and_never_deletes(tmp_path):
    first = HistoryCSVLogger(str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.9}, step=1)
    first.save()
    # A resume appends under the old header; a new column rewrites the file with every old row.
    resumed = HistoryCSVLogger(str(tmp_path), resume=True)
    resumed.log_metrics({"train/loss": 0.8}, step=2)
    resumed.log_metrics({"val/loss": 0.7, "train/loss": 0.75}, step=3)
    resumed.save()
    header, rows = _rows(tmp_path / "metrics.csv")
    assert header == ["step", "train/loss", "val/loss"]
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "0.9", ""),
        ("2", "0.8", ""),
        ("3", "0.75", "0.7"),
    ]
    # Rows logged after the checkpoint a resume starts from are dropped (the resume logs them again).
    again = HistoryCSVLogger(str(tmp_path), resume=True)
    again.experiment.keep_rows(3)
    again.log_metrics({"train/loss": 0.5}, step=3)
    again.save()
    assert [r["step"] for r in _rows(tmp_path / "metrics.csv")[1]] == ["0", "1", "2", "3"]
    assert _rows(tmp_path / "metrics.csv")[1][-1]["train/loss"] == "0.5"
    # A fresh run in a directory that holds a metrics.csv moves it aside instead of deleting it.
    fresh = HistoryCSVLogger(str(tmp_path))
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.save()
    aside = list(tmp_path.glob("metrics-*.csv"))
    assert len(aside) == 1 and len(_rows(aside[0])[1]) == 4 and len(_rows(tmp_path / "metrics.csv")[1]) == 1


def _fit_logged(run_dir: Path, epochs: int, ckpt_path=None):
    from mimzoo.data import MIMDataModule

    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=HistoryCSVLogger(str(run_dir), resume=ckpt_path is not None),
        callbacks=[LastCheckpoint(str(run_dir / "checkpoints")), MetricsHistory()],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(MAE(**TINY_MAE), datamodule=MIMDataModule("fake", batch_size=8, num_workers=0), ckpt_path=ckpt_path)


def test_resume_keeps_the_rows_its_checkpoint_covers(tmp_path):
    """Each checkpoint records how many metrics.csv rows it covers; rows a killed run logged after it are
    dropped on resume (the resume logs those steps again), every earlier row is kept."""
    _fit_logged(tmp_path, epochs=1)
    header, first = _rows(tmp_path / "metrics.csv")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["callbacks"]["MetricsHistory"] == {"metrics_rows": len(first)}
    with open(tmp_path / "metrics.csv", "a", newline="") as f:  # logged after the checkpoint, then killed
        csv.DictWriter(f, fieldnames=header).writerows([{"step": "999", "train/loss": "9"}] * 2)
    _fit_logged(tmp_path, epochs=2, ckpt_path=str(last))
    _, rows = _rows(tmp_path / "metrics.csv")
    assert rows[: len(first)] == first and len(rows) > len(first) and "999" not in {r["step"] for r in rows}


# --- resumes that change the experiment ---------------------------------------------------------------
def test_experiment_changes_are_the_guarded_keys():
    old = {
        "model": {"decoder": {"dim": 32}},
        "mask": {"ratio": 0.75},
        "optim": {"blr": 1e-3},
        "seed": 0,
        "data": {"batch_size": 64, "num_workers": 2},
        "trainer": {"max_epochs": 1, "devices": 1, "precision": "32"},
    }
    new = {
        "model": {"decoder": {"dim": 64}, "head": {"dim": 8}},
        "mask": {"ratio": 0.75},
        "optim": {"blr": 2e-3},
        "seed": 0,
        "data": {"batch_size": 64, "num_workers": 8},
        "trainer": {"max_epochs": 5, "devices": 2, "precision": "bf16-mixed"},
    }
    assert experiment_changes(old, new) == {
        "model.decoder.dim": (32, 64),
        "model.head.dim": ("<absent>", 8),
        "optim.blr": (1e-3, 2e-3),
        "trainer.precision": ("32", "bf16-mixed"),
    }


def _launch(run_dir: Path, overrides: list[str], resume: bool):
    """What Hydra does at each launch (rewrite .hydra/), then the record's check."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra_dir / "config.yaml").write_text(f"launch: {overrides}\n")
    return RunRecord(run_dir, "mimzoo-train").accept(compose_train(*overrides), resume=resume)


def test_resume_record_refuses_changes_unless_allowed(tmp_path):
    first = [*TINY, "trainer.max_epochs=1"]
    _launch(tmp_path, first, resume=False)
    resume = [*TINY, "ckpt_path=last", "trainer.max_epochs=5", "trainer.devices=1", "logger=csv"]
    assert _launch(tmp_path, resume, resume=True) == {}
    # Hydra rewrote overrides.yaml at the resume: the first launch's is back; config.yaml is the resume's.
    assert yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text()) == first
    accepted_config = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "trainer.max_epochs=5" in accepted_config
    with pytest.raises(RunDirRefused) as refused:
        _launch(tmp_path, [*resume, "mask.ratio=0.5", "optim.blr=1e-3"], resume=True)
    message = str(refused.value)
    assert "mask.ratio: 0.75 -> 0.5" in message and "optim.blr: 0.00015 -> 0.001" in message
    assert "resume_allow_changes=[mask.ratio,optim.blr]" in message
    # A refused launch leaves .hydra/ as the accepted launches left it.
    assert yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text()) == first
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == accepted_config
    with pytest.raises(RunDirRefused, match="optim.blr"):  # allowing one key does not allow the other
        _launch(tmp_path, [*resume, "mask.ratio=0.5", "optim.blr=1e-3", "resume_allow_changes=[mask.ratio]"], True)
    changes = _launch(
        tmp_path, [*resume, "mask.ratio=0.5", "optim.blr=1e-3", "resume_allow_changes=[mask,optim.blr]"], True
    )
    assert set(changes) == {"mask.ratio", "optim.blr"}
    launches = RunRecord(tmp_path, "mimzoo-train").launches()
    assert len(launches) == 3 and launches[-1]["changes"]["mask.ratio"] == [0.75, 0.5]
    # The accepted values are the new baseline: resuming with them again needs no allowance.
    assert _launch(tmp_path, [*resume, "mask.ratio=0.5", "optim.blr=1e-3"], resume=True) == {}
    with pytest.raises(RunDirRefused, match="seed: 0 -> 1"):  # the seed names the run: guarded too
        _launch(tmp_path, [*resume, "mask.ratio=0.5", "optim.blr=1e-3", "seed=1"], resume=True)


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
SHORT = [
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "recon.enabled=false",
]


def _shape(rows):
    """What a row is, whatever the values: its epoch, its step and which columns it fills."""
    return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v and k != "step"))) for r in rows]


@pytest.mark.slow
def test_resume_keeps_history_and_refuses_a_changed_experiment(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run, straight = tmp_path / "run", tmp_path / "straight"
    cli("train", *TINY, *SHORT, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    first_overrides = (run / ".hydra" / "overrides.yaml").read_text()
    _, first_rows = _rows(run / "metrics.csv")
    proc = cli("train", *TINY, *SHORT, "trainer.max_epochs=2", f"hydra.run.dir={run}", "ckpt_path=last")
    assert "previous log files" not in proc.stderr.lower()
    header, rows = _rows(run / "metrics.csv")
    assert rows[: len(first_rows)] == first_rows and len(rows) > len(first_rows)
    assert {r["epoch"] for r in rows} >= {"0", "1"}
    # The same rows, in the same order, as a run of two epochs straight (values aside: exact resume is not this test's).
    cli("train", *TINY, *SHORT, "trainer.max_epochs=2", "logger=csv", f"hydra.run.dir={straight}")
    straight_header, straight_rows = _rows(straight / "metrics.csv")
    assert header == straight_header and _shape(rows) == _shape(straight_rows)
    # The first launch's overrides are kept, the resume is on record; one W&B run, continued; only last.ckpt.
    assert (run / ".hydra" / "overrides.yaml").read_text() == first_overrides
    launches = RunRecord(run, "mimzoo-train").launches()
    assert [launch["resume"] for launch in launches] == [None, "last"]
    run_id = (run / "wandb_id.txt").read_text().strip()
    wandb_runs = sorted(run.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and all((w / f"run-{run_id}.wandb").is_file() for w in wandb_runs)
    assert os.listdir(run / "checkpoints") == ["last.ckpt"]
    # A resume that changes the experiment: refused before anything is built, every difference listed.
    changed = [o for o in TINY if not o.startswith("model.decoder.dim")] + ["model.decoder.dim=64", "mask.ratio=0.5"]
    config_before = (run / ".hydra" / "config.yaml").read_text()
    ckpt_before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    proc = cli(
        "train", *changed, *SHORT, "trainer.max_epochs=3", f"hydra.run.dir={run}", "ckpt_path=last", expect_ok=False
    )
    assert "refusing to resume" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert "mask.ratio: 0.75 -> 0.5" in proc.stderr and "model.decoder.dim: 32 -> 64" in proc.stderr
    assert "resume_allow_changes=[mask.ratio,model.decoder.dim]" in proc.stderr
    assert "size mismatch" not in proc.stderr
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpt_before
    assert _rows(run / "metrics.csv")[1] == rows
    assert (run / ".hydra" / "config.yaml").read_text() == config_before
    assert (run / ".hydra" / "overrides.yaml").read_text() == first_overrides
    # Allowed on purpose: the run goes on with the new mask ratio, and the record says so.
    cli(
        "train",
        *TINY,
        *SHORT,
        "mask.ratio=0.5",
        "resume_allow_changes=[mask.ratio]",
        "trainer.max_epochs=3",
        f"hydra.run.dir={run}",
        "ckpt_path=last",
    )
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 9
    assert RunRecord(run, "mimzoo-train").launches()[-1]["changes"] == {"mask.ratio": [0.75, 0.5]}


@pytest.mark.slow
def test_second_run_in_a_live_run_dir_is_refused(tmp_path, cli):
    """A real mimzoo-train holds the directory; a second mimzoo-train and a mimzoo-eval there are refused with
    the holder's pid, and the holder's files are untouched; once it is killed, the next run takes over."""
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mimzoo.train",
            *TINY,
            "trainer.max_epochs=100000",
            "logger=csv",
            "probe.knn.enabled=false",
            "recon.enabled=false",
            "trainer.limit_val_batches=0",
            f"hydra.run.dir={run}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.time() + 300
        while not (run / "mimzoo.lock").exists() or f"pid: {first.pid}\n" not in (run / "mimzoo.lock").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = cli(
            "train", *TINY, "trainer.max_steps=1", "logger=csv", "seed=1", f"hydra.run.dir={run}", expect_ok=False
        )
        assert f"is in use by another live run (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None  # the first run goes on
        assert (run / ".hydra" / "overrides.yaml").read_text() == overrides
        evaluation = cli(
            "evaluate",
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "logger=csv",
            f"hydra.run.dir={run}",
            expect_ok=False,
        )
        assert f"mimzoo-eval: error: {run} is in use by another live run (pid {first.pid}" in evaluation.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = cli(
        "train",
        *TINY,
        "trainer.max_steps=1",
        "logger=csv",
        "probe.knn.enabled=false",
        "recon.enabled=false",
        f"hydra.run.dir={run}",
    )
    assert f"taking over the lock of a run that is no longer running (pid {first.pid}" in third.stdout + third.stderr
    assert not (run / "mimzoo.lock").exists()
