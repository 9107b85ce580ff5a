"""Shared test setup: offline data from $MIMZOO_DATA (else a synthetic stand-in), W&B never online, tiny
model overrides, and the ``cli`` fixture that runs the real entry points in a subprocess."""

import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MIMZOO_DATA", str(REPO.parent / "shared" / "data"))


def _write_synthetic_cifar10_mini(root: Path) -> None:
    """Random images in CIFAR-10's original pickle format (512 train / 256 test), for machines
    without the real cifar10-mini fixture: the same loader and pipeline run, only accuracy is moot."""
    folder = root / "cifar10-mini" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 512), ("test_batch", 256)):
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


if not (Path(os.environ["MIMZOO_DATA"]) / "cifar10-mini" / "cifar-10-batches-py" / "data_batch_1").exists():
    _synthetic = Path(tempfile.mkdtemp(prefix="mimzoo-data-"))
    _write_synthetic_cifar10_mini(_synthetic)
    os.environ["MIMZOO_DATA"] = str(_synthetic)
if os.environ.get("PYTEST_XDIST_WORKER"):  # the slow tier runs on 2 pytest processes: one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # the runs they launch included, so 2 cores are not oversubscribed
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# A model small enough for 2 CPU cores: width 32, depth 2, 32x32 images, patch 4 (8x8 grid).
TINY = [
    "data=cifar10_mini",
    "model/encoder=test",
    "model.decoder.dim=32",
    "model.decoder.depth=1",
    "model.decoder.num_heads=2",
    "data.batch_size=64",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "probe.knn.max_bank=512",
]

# The same for iBOT: a 64-prototype head, two 12px local crops, no blur on 32px images.
TINY_IBOT = [
    "model=ibot",
    "data=cifar10_mini",
    "model/encoder=test",
    "model.head.out_dim=64",
    "model.head.hidden_dim=32",
    "model.head.bottleneck_dim=16",
    "model.views.local_number=2",
    "model.views.blur=false",
    "data.batch_size=32",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "probe.knn.max_bank=256",
]

TINY_MAE = dict(
    encoder=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    decoder=dict(dim=32, depth=1, num_heads=2),
)


def run_cli(module: str, *args: str, expect_ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m mimzoo.<module> *args`` (e.g. ``run_cli("train", *TINY, "trainer.max_steps=1")``) in a fresh
    process with this process's environment, output captured as text. Fails the test, naming the command and
    showing the end of its output, when the exit status is not the expected one (0 when ``expect_ok``, non-zero
    otherwise) or when the run takes longer than ``timeout`` seconds."""
    __tracebackhide__ = True
    cmd = [sys.executable, "-m", f"mimzoo.{module}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(
            f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-5000:]}"
        )
    if (proc.returncode == 0) != expect_ok:
        expected = "0" if expect_ok else "non-zero"
        pytest.fail(
            f"exit status {proc.returncode} (expected {expected}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """An entry point run in-process configures the job log (Hydra's dictConfig): its console handler holds
    that test's captured stderr. Put the root logger back, so no later test logs into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture(scope="session")
def cli():
    """:func:`run_cli`, as a fixture (session-scoped, so module-scoped fixtures can launch runs too).
    Tests that use it launch processes and belong to the slow tier: mark them ``@pytest.mark.slow``."""
    return run_cli


@pytest.fixture
def tiny_mae():
    import torch

    from mimzoo.methods import MAE

    torch.manual_seed(0)
    return MAE(**TINY_MAE).eval()
