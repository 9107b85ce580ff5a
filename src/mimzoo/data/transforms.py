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
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                *normalize,
            ]
        )
    if kind == "linear":
        return T.Compose([T.RandomResizedCrop(image_size, interpolation=bicubic), T.RandomHorizontalFlip(), *normalize])
    if kind == "finetune":
        from timm.data import create_transform

        _allow_zero_bit_posterize()
        return create_transform(
            image_size,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=mean,
            std=std,
        )
    if kind == "none":
        return T.Compose(normalize)
    if kind == "eval":
        resize = int(round(image_size / crop_pct))
        return T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(image_size), *normalize])
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {TRAIN_AUGS + ('eval',)}")


class MultiCrop:
    """iBOT/DINO multi-crop (``DataAugmentationiBOT``): two global crops and ``local_number`` local
    crops of one image, as a list ``[global_1, global_2, local_1, ...]``. Each crop: bicubic
    RandomResizedCrop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, then
    Gaussian blur (sigma 0.1-2) with p 1.0 / 0.1 / 0.5 for global 1 / global 2 / local, and
    solarisation p 0.2 on global 2. The blur kernel covers ~10% of the crop side (BYOL's rule);
    ``blur=False`` drops it (tiny images such as 32px CIFAR)."""

    def __init__(
        self,
        image_size: int,
        local_size: int,
        local_number: int = 0,
        global_scale: tuple = (0.14, 1.0),
        local_scale: tuple = (0.05, 0.4),
        blur: bool = True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        bicubic = InterpolationMode.BICUBIC
        flip_and_color = [
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        normalize = [T.ToTensor(), T.Normalize(mean, std)]

        def crop(size, scale, blur_p, solarize_p=0.0):
            ops = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic), *flip_and_color]
            if blur and blur_p > 0:
                kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
                ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
            if solarize_p > 0:
                ops.append(T.RandomSolarize(128, p=solarize_p))
            return T.Compose(ops + normalize)

        self.global_1 = crop(image_size, global_scale, 1.0)
        self.global_2 = crop(image_size, global_scale, 0.1, solarize_p=0.2)
        self.local = crop(local_size, local_scale, 0.5)
        self.local_number = local_number

    def __call__(self, image):
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.local_number)]


def primary_view(images):
    """The images of a batch, or the first global crop of a multi-crop batch (probes, counting)."""
    return images[0] if isinstance(images, (list, tuple)) else images


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
