"""CIFAR-10/100 from the original pickles, any ImageNet-layout folder, and fake data for smoke tests."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

# name -> (sub-folder of the data root, folder inside it, train files, test files, label key, classes)
_CIFAR = {
    "cifar10": ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar10-mini": ("cifar10-mini", "cifar-10-batches-py", ["data_batch_1"], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar100", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def default_root() -> str:
    """``$MIMZOO_DATA`` if set, else ``./data``."""
    return os.environ.get("MIMZOO_DATA", "./data")


class CIFAR(Dataset):
    """CIFAR read straight from its pickles (no md5 check, so copies without ``filenames`` load too).

    When the files are missing and ``download`` is true, torchvision fetches the official archive.
    """

    def __init__(self, root: str, name: str = "cifar10", train: bool = True, transform=None, download: bool = False):
        if name not in _CIFAR:
            raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {sorted(_CIFAR)}")
        sub, folder, train_files, test_files, label_key, self.num_classes = _CIFAR[name]
        base = Path(root).expanduser() / sub
        files = train_files if train else test_files
        if not all((base / folder / f).exists() for f in files):
            if not download or name == "cifar10-mini":
                raise FileNotFoundError(
                    f"{name} not found under {base / folder}. Point MIMZOO_DATA (or data.root=...) at the folder "
                    f"that holds {sub}/{folder}/, or pass data.download=true to download it there with torchvision."
                )
            try:
                (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(base), train=train, download=True)
            except OSError as err:  # URLError and friends: no network, proxy, full disk
                raise FileNotFoundError(
                    f"{name} is not under {base / folder} and downloading it failed ({err}). Copy the "
                    f"'{folder}' folder there, or point MIMZOO_DATA at a folder that holds {sub}/{folder}/."
                ) from err
        xs, ys = [], []
        for f in files:
            with open(base / folder / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(d[b"data"])
            ys.extend(d[label_key])
        self.data = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC uint8
        self.targets = torch.as_tensor(ys, dtype=torch.long)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def build_dataset(name: str, root: str | None, train: bool, transform, image_size: int, download: bool = False,
                  fake_size: int = 256, num_classes: int | None = None):
    """One entry for every data set the configs name.

    ``imagefolder``: ``root`` holds ``train/`` and ``val/`` with one sub-folder per class.
    ``fake``: random images, deterministic per index.
    """
    root = root or default_root()
    if name in _CIFAR:
        return CIFAR(root, name, train=train, transform=transform, download=download)
    if name == "imagefolder":
        split = Path(root).expanduser() / ("train" if train else "val")
        if not split.is_dir():
            raise FileNotFoundError(
                f"image folder {split} does not exist; set data.root to a folder with train/ and val/ "
                "sub-folders, each holding one folder of images per class (ImageNet layout)"
            )
        return tvd.ImageFolder(str(split), transform=transform)
    if name == "fake":
        return tvd.FakeData(size=fake_size if train else max(fake_size // 4, 1), image_size=(3, image_size, image_size),
                            num_classes=num_classes or 10, transform=transform, random_offset=0 if train else 10**6)
    raise ValueError(f"unknown data set {name!r}; choose cifar10, cifar10-mini, cifar100, imagefolder or fake")


def num_classes_of(dataset) -> int:
    if hasattr(dataset, "num_classes"):
        return dataset.num_classes
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    raise ValueError("cannot tell the number of classes of this data set")
