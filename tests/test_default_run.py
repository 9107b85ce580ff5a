"""A default run, tiny: what it prints and what it leaves. ``mimzoo-train`` with the default logger (CSV + W&B, offline
here) on cifar10-mini with the test encoder, one epoch, in a subprocess: the W&B run's images are the PNG panels
on disk (not black), the console shows no warning or tip a user cannot act on, and ``train.log`` holds the log."""

import os
import re

import numpy as np
import pytest
from PIL import Image

# What a default run must not print (stdout or stderr): warnings of any kind, Lightning's and W&B's tips, and the
# particular messages a default run used to print.
NOISE = [
    r"(?i)warn",
    r"(?i)\btip\b",
    "💡",
    r"(?i)deprecat",
    "will be deleted",
    "will have no effect",
    "litlogger",
    "anonymous",
    "flops_per_batch",
    "log_every_n_steps",
    r"(?i)consider (setting|increasing)",
    "wandb leet",
    r"Trainer\(limit_\w+_batches=1.0\)",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("default")
    saved = {key: os.environ.get(key) for key in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ["WANDB_MODE"] = "offline"  # W&B as without an account: an offline run in the run dir's wandb/
    os.environ.pop("WANDB_SILENT", None)  # conftest silences W&B for the other tests; this one hears all it says
    try:
        proc = cli(
            "train",
            "data=cifar10_mini",
            "model/encoder=test",
            "trainer.max_epochs=1",
            "logger.wandb.enabled=true",
            f"hydra.run.dir={run_dir}",
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return run_dir, proc


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
def test_wandb_images_are_the_png_panels(default_run):
    run_dir, _ = default_run
    panels = sorted((run_dir / "reconstructions").glob("epoch_*.png"))
    logged = sorted(run_dir.glob("wandb/offline-run-*/files/media/images/reconstruction_*.png"))
    assert len(panels) == 1 and len(logged) == 1
    disk, wandb = pixels(panels[0]), pixels(logged[0])
    assert wandb.shape == disk.shape and np.abs(wandb - disk).max() <= 1  # PNG round trip: the same pixels
    assert wandb.max() > 200 and wandb.mean() > 20  # not the black image of a float tensor logged unscaled


@pytest.mark.slow
def test_default_run_prints_no_warnings_and_train_log_holds_the_log(default_run):
    run_dir, proc = default_run
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if any(re.search(p, line) for p in NOISE)]
    assert not noisy, "\n".join(noisy)
    assert proc.stderr.count("Trainer.fit` stopped: `max_epochs=1` reached") == 1  # Lightning's lines, once each
    log = (run_dir / "train.log").read_text()
    messages = [line.split("] - ", 1)[1] for line in log.splitlines() if "] - " in line]
    assert all(line in messages for line in proc.stderr.splitlines() if line.strip())  # the console's log lines
    assert f"mimzoo: checkpoint      {run_dir / 'checkpoints' / 'last.ckpt'}" in messages  # and the summary
    assert "Seed set to 0" in messages
