"""The augmentations the papers use: MAE pre-training, linear probe, fine-tuning, evaluation."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRAIN_AUGS = ("mae", "linear", "finetune", "none")


def build_transform(kind: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct: float = 0.875):
    """``kind``: ``mae`` (RandomResizedCrop scale 0.2-1 + flip, MAE pre-training), ``linear``
    (RandomResizedCrop + flip, MAE linear probe), ``finetune`` (timm RandAugment m9 + random erasing
    0.25, MAE fine-tuning), ``none`` (tensor + normalise) or ``eval`` (resize ``size/crop_pct``,
    centre crop; ``crop_pct=1`` keeps 32px CIFAR as it is)."""
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    bicubic = InterpolationMode.BICUBIC
    if kind == "mae":
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(), *normalize])
    if kind == "linear":
        return T.Compose([T.RandomResizedCrop(image_size, interpolation=bicubic), T.RandomHorizontalFlip(), *normalize])
    if kind == "finetune":
        from timm.data import create_transform

        _allow_zero_bit_posterize()
        return create_transform(image_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=mean, std=std)
    if kind == "none":
        return T.Compose(normalize)
    if kind == "eval":
        resize = int(round(image_size / crop_pct))
        return T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(image_size), *normalize])
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {TRAIN_AUGS + ('eval',)}")


def _allow_zero_bit_posterize():
    """RandAugment's posterize asks for 0 bits at the top magnitude (m9 + noise >= 10), which recent Pillow
    rejects with a ValueError; 0 bits is the black image older Pillow returned, so give that instead."""
    from PIL import Image
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **kwargs):
        return Image.new(img.mode, img.size) if bits_to_keep < 1 else auto_augment.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize


def denormalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Back to [0, 1] pixels for pictures."""
    m = images.new_tensor(mean).view(1, -1, 1, 1)
    s = images.new_tensor(std).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
