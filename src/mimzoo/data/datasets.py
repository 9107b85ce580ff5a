"""CIFAR-10/100 from the original pickles, any ImageNet-layout folder, and fake data for smoke tests."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from mimzoo.errors import ConfigError, DataError, MissingFileError

# name -> (sub-folder of the data root, folder inside it, train files, test files, label key, classes)
_CIFAR = {
    "cifar10": (
        "cifar10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
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
            raise ConfigError(f"unknown CIFAR variant {name!r}; choose one of {sorted(_CIFAR)}")
        sub, folder, train_files, test_files, label_key, self.num_classes = _CIFAR[name]
        base = Path(root).expanduser() / sub
        files = train_files if train else test_files
        if not all((base / folder / f).exists() for f in files):
            if not download or name == "cifar10-mini":
                raise MissingFileError(
                    f"{name} not found under {base / folder}. Point MIMZOO_DATA (or data.root=...) at the folder "
                    f"that holds {sub}/{folder}/, or pass data.download=true to download it there with torchvision."
                )
            try:
                (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(base), train=train, download=True)
            except OSError as err:  # URLError and friends: no network, proxy, full disk
                raise MissingFileError(
                    f"{name} is not under {base / folder} and downloading it failed ({err}). Copy the "
                    f"'{folder}' folder there, or point MIMZOO_DATA at a folder that holds {sub}/{folder}/."
                ) from err
        xs, ys = [], []
        for f in files:
            x, y = read_cifar_batch(base / folder / f, label_key, name, download_fix=name != "cifar10-mini")
            xs.append(x)
            ys.extend(y)
        self.data = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC uint8
        self.targets = torch.as_tensor(ys, dtype=torch.long)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def read_cifar_batch(path: Path, label_key: bytes, name: str, download_fix: bool = True):
    """Images ``[N, 3072]`` uint8 and labels of one CIFAR pickle; a truncated or garbage file is a
    :class:`DataError` naming it and the fix (nothing is deleted)."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3072)
        y = [int(v) for v in d[label_key]]
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
    except Exception as err:  # noqa: BLE001 - every way a cut-short or foreign file fails to parse (EOFError,
        # UnpicklingError, KeyError, TypeError, ValueError...) is the same problem: the file is not a CIFAR batch
        folder = path.parent
        fix = (
            f"delete {folder} and run again with data.download=true, or copy it again from the archive"
            if download_fix
            else f"copy {folder} again from a good copy of {name}"
        )
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise DataError(f"{path} is not a readable {name} batch ({reason}); it is truncated or corrupt: {fix}") from err
    return x, y


class ImageFolder(tvd.ImageFolder):
    """torchvision's ``ImageFolder`` that deals with files PIL cannot read (truncated, 0 bytes, not an
    image) when they are loaded: ``bad_images="skip"`` warns with the file and the number skipped so far
    (per data-loader worker) and returns the next readable image instead; ``"error"`` stops with a
    :class:`DataError` naming the file."""

    def __init__(self, root: str, transform=None, bad_images: str = "skip"):
        if bad_images not in ("skip", "error"):
            raise ConfigError(f"data.bad_images must be 'skip' or 'error', got {bad_images!r}")
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as err:  # no class folders, or no image files in them
            raise MissingFileError(f"{root}: {err}; each class needs a folder of images (ImageNet layout)") from err
        self.bad_images = bad_images
        self.skipped: set[str] = set()

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated, empty or not an image
                if self.bad_images == "error":
                    raise DataError(
                        f"unreadable image {path} ({err}): replace or delete it, or set "
                        "data.bad_images=skip to skip unreadable images with a warning"
                    ) from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(
                        f"skipped unreadable image {path} ({err}); {len(self.skipped)} skipped so far in "
                        "this data loader (data.bad_images=skip; =error stops at the first one)",
                        stacklevel=2,
                    )
                continue
            return (self.transform(image) if self.transform else image), target
        raise DataError(f"no readable image in {self.root}")


def build_dataset(
    name: str,
    root: str | None,
    train: bool,
    transform,
    image_size: int,
    download: bool = False,
    fake_size: int = 256,
    num_classes: int | None = None,
    bad_images: str = "skip",
):
    """One entry for every data set the configs name.

    ``imagefolder``: ``root`` holds ``train/`` and ``val/`` with one sub-folder per class; unreadable
    image files are skipped with a warning or stop the run (``bad_images``, see :class:`ImageFolder`).
    ``fake``: random images, deterministic per index.
    """
    root = root or default_root()
    if name in _CIFAR:
        return CIFAR(root, name, train=train, transform=transform, download=download)
    if name == "imagefolder":
        split = Path(root).expanduser() / ("train" if train else "val")
        if not split.is_dir():
            raise MissingFileError(
                f"image folder {split} does not exist; set data.root to a folder with train/ and val/ "
                "sub-folders, each holding one folder of images per class (ImageNet layout)"
            )
        return ImageFolder(str(split), transform=transform, bad_images=bad_images)
    if name == "fake":
        return tvd.FakeData(
            size=fake_size if train else max(fake_size // 4, 1),
            image_size=(3, image_size, image_size),
            num_classes=num_classes or 10,
            transform=transform,
            random_offset=0 if train else 10**6,
        )
    raise ConfigError(f"unknown data set {name!r}; choose cifar10, cifar10-mini, cifar100, imagefolder or fake")


def num_classes_of(dataset) -> int:
    if hasattr(dataset, "num_classes"):
        return dataset.num_classes
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    raise ValueError("cannot tell the number of classes of this data set")
