"""Shared test setup: offline data from ../shared/data, W&B never online, tiny model overrides."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MIMZOO_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# A model small enough for 2 CPU cores: width 32, depth 2, 32x32 images, patch 4 (8x8 grid).
TINY = [
    "data=cifar10_mini", "model/encoder=test", "model.decoder.dim=32", "model.decoder.depth=1",
    "model.decoder.num_heads=2", "data.batch_size=64", "data.num_workers=0", "trainer.enable_progress_bar=false",
    "probe.knn.max_bank=512",
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
