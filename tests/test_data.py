"""Data sets and transforms: CIFAR-100 pickles, image folders, fake data, the MAE augmentation."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mimzoo.data import MIMDataModule, build_dataset, build_transform
from mimzoo.data.datasets import CIFAR


def test_cifar10_mini_reads_the_original_pickles():
    ds = CIFAR(root=os.environ["MIMZOO_DATA"], name="cifar10-mini", train=True)
    img, label = ds[0]
    assert len(ds) == 512 and img.size == (32, 32) and 0 <= label < 10 and ds.num_classes == 10


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 20), ("test", 10)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"fine_labels": rng.integers(0, 100, n).tolist(),
                    b"coarse_labels": [0] * n,
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                },
                f,
            )
    ds = CIFAR(str(tmp_path), "cifar100", train=False, transform=build_transform("eval", 32, crop_pct=1.0))
    x, y = ds[3]
    assert len(ds) == 10 and x.shape == (3, 32, 32) and ds.num_classes == 100
    raw = np.frombuffer(pickle.load(open(folder / "test", "rb"))[b"data"][3].tobytes(), np.uint8)
    assert np.array_equal(
        np.asarray(CIFAR(str(tmp_path), "cifar100", train=False)[3][0]).transpose(2, 0, 1).ravel(), raw
    )


def test_image_folder_layout(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 50, 3), i * 40, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = MIMDataModule(
        name="imagefolder", root=str(tmp_path), image_size=32, batch_size=2, num_workers=0, crop_pct=0.875
    )
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and dm.num_classes == 2
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        build_dataset("imagefolder", str(tmp_path / "missing"), True, None, 32)


def test_mae_augmentation_crops_flips_and_normalises():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    tf = build_transform("mae", 32)
    torch.manual_seed(0)
    a, b = tf(img), tf(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops differ
    assert -2.5 < a.min() < 0 < a.max() < 2.7  # ImageNet-normalised
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_transform("colorjitter", 32)


def test_fake_data_is_deterministic():
    """Random images, deterministic per index: a fresh data set (another worker, rank or run) gives the same
    image and label for an index whatever the global RNG state, and different indices give different images."""

    def fake():
        dm = MIMDataModule(name="fake", image_size=32, batch_size=4, num_workers=0, fake_size=8, train_aug="none")
        return dm._dataset("train")

    torch.manual_seed(0)
    ds = fake()
    image, label = ds[1]
    torch.manual_seed(1)
    again, fresh = ds[1], fake()[1]
    assert torch.equal(again[0], image) and again[1] == label  # the same data set, asked again
    assert torch.equal(fresh[0], image) and fresh[1] == label  # a fresh one
    assert not torch.equal(ds[2][0], image)  # one image per index, not one for all
