"""Shared test setup: offline data from $MIMZOO_DATA (else a synthetic stand-in), W&B never online, tiny
model overrides."""

import os
import pickle
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
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


if not (Path(os.environ["MIMZOO_DATA"]) / "cifar10-mini" / "cifar-10-batches-py" / "data_batch_1").exists():
    _synthetic = Path(tempfile.mkdtemp(prefix="mimzoo-data-"))
    _write_synthetic_cifar10_mini(_synthetic)
    os.environ["MIMZOO_DATA"] = str(_synthetic)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# A model small enough for 2 CPU cores: width 32, depth 2, 32x32 images, patch 4 (8x8 grid).
TINY = [
    "data=cifar10_mini", "model/encoder=test", "model.decoder.dim=32", "model.decoder.depth=1",
    "model.decoder.num_heads=2", "data.batch_size=64", "data.num_workers=0", "trainer.enable_progress_bar=false",
    "probe.knn.max_bank=512",
]

# The same for iBOT: a 64-prototype head, two 12px local crops, no blur on 32px images.
TINY_IBOT = [
    "model=ibot", "data=cifar10_mini", "model/encoder=test", "model.head.out_dim=64", "model.head.hidden_dim=32",
    "model.head.bottleneck_dim=16", "model.views.local_number=2", "model.views.blur=false", "data.batch_size=32",
    "data.num_workers=0", "trainer.enable_progress_bar=false", "probe.knn.max_bank=256",
]

TINY_MAE = dict(
    encoder=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
    decoder=dict(dim=32, depth=1, num_heads=2),
)


@pytest.fixture
def tiny_mae():
    import torch

    from mimzoo.methods import MAE

    torch.manual_seed(0)
    return MAE(**TINY_MAE).eval()
