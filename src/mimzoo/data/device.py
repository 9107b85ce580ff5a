"""``data.loader=device``: the training split held once as a uint8 tensor ``[N, 3, H, W]`` on the training device,
and whole batches augmented there with batched tensor ops instead of PIL image by image.

A batch's random parameters come from one ``torch.Generator`` on that device seeded from (seed, epoch, batch index,
rank) (:mod:`mimzoo.seeding`), so a resumed run redraws them exactly. Its samples are the ones the PIL path's
:class:`~mimzoo.data.ResumableSampler` gives the same batch, in the same order.

What differs from the PIL path (:mod:`mimzoo.data.transforms`), on purpose or because batched ops cannot follow it:

* crop + resize: crop boxes are sampled as torchvision's ``RandomResizedCrop.get_params`` samples them (10 tries of
  scale and log-ratio, then the centre-crop fallback), but with this generator, so the draws are not PIL's.
  The resize is ``torchvision.ops.roi_align`` (``aligned=True``, adaptive sampling): bilinear when enlarging (CIFAR's
  crops), the mean of bilinear samples over each output pixel's area when shrinking (a box filter); PIL's bicubic
  is sharper when enlarging (cubic overshoot), PIL's antialias is a wider filter when shrinking. roi_align also
  interpolates across the crop's edge into the rest of the image where PIL repeats the edge pixel.
* colour jitter: per-sample brightness, contrast, saturation and hue factors from torchvision's ranges, applied
  with probability 0.8 per sample, in float (PIL rounds to uint8 after each step). torchvision shuffles the four
  per image; here the order is shuffled per batch (brightness, contrast and saturation commute up to clipping, so
  it is hue's place that can differ).
* grayscale, Gaussian blur (reflect padding, per-sample sigma) and solarisation: per-sample probabilities as PIL's,
  computed for the whole batch and kept where drawn (the same images, up to float rounding).
* an image folder is stored once resized (shorter side, bicubic) and centre-cropped to ``memory_image_size``: crops
  are drawn from that square, not from the full original picture.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.ops import roi_align

from mimzoo.errors import DataError
from mimzoo.seeding import DEVICE_AUGMENTATION, derive_seed

from .sampling import ResumableSampler

GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision


# --- the data in memory --------------------------------------------------------------------------------------------


def check_memory(name: str, count: int, size: tuple[int, int], limit_gb: float, resized: bool = True) -> None:
    """Refuse, before reading anything, a data set whose uint8 tensor would be larger than ``limit_gb``
    (``resized``: its stored size is ``data.memory_image_size``, one more way out)."""
    need = count * 3 * size[0] * size[1] / 1e9
    if need > limit_gb:
        smaller = ", lower data.memory_image_size" if resized else ""
        raise DataError(
            f"data.loader=device holds {name} in memory as {count} images of 3x{size[0]}x{size[1]} uint8 "
            f"({need:.3g} GB), over data.memory_limit_gb={limit_gb:g}: raise data.memory_limit_gb (the training "
            f"device must hold it){smaller}, or use data.loader=pil"
        )


def load_uint8(dataset, name: str, memory_image_size: int, limit_gb: float, num_workers: int = 0):
    """The whole data set (built for this, its transform is replaced) as ``(images uint8 [N, 3, H, W], labels long
    [N])`` on the CPU. CIFAR comes straight from its arrays; any other data set (image folder, fake) is decoded
    once, each image resized (shorter side, bicubic) and centre-cropped to ``memory_image_size`` (with
    ``num_workers`` decoding processes)."""
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):  # CIFAR: NHWC uint8 already
        check_memory(name, len(dataset), dataset.data.shape[1:3], limit_gb, resized=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.long)
    size = memory_image_size
    check_memory(name, len(dataset), (size, size), limit_gb)
    dataset.transform = T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()]
    )
    images = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    done = 0
    for x, y in DataLoader(dataset, batch_size=256, num_workers=num_workers):
        images[done : done + len(x)], labels[done : done + len(x)] = x, y
        done += len(x)
    return images, labels


# --- batched augmentations (float images in [0, 1] unless said otherwise) ------------------------------------------


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def _chance(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) < p


def crop_boxes(
    n: int, height: int, width: int, scale, gen: torch.Generator, device, ratio=(3 / 4, 4 / 3), tries: int = 10
) -> torch.Tensor:
    """``[n, 4]`` float boxes ``(x1, y1, x2, y2)`` in pixels, sampled per sample as torchvision's
    ``RandomResizedCrop.get_params``: up to ``tries`` draws of an area fraction in ``scale`` and a log-uniform
    aspect ratio, the first whose rounded box fits, at a uniform integer position; else the whole image cropped to
    the nearest ratio in range, centred. All tries are drawn at once (no host sync)."""
    area = height * width
    target = area * _uniform(n * tries, scale[0], scale[1], gen, device).view(n, tries)
    log_ratio = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device).view(n, tries)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 when none does: the fallback below)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # fallback: the whole image, cropped to the nearest ratio in range (torchvision's int() truncation)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # position: torch.randint(0, H - h + 1) as floor(u * (H - h + 1)); the fallback is centred
    u = torch.rand(2, n, device=device, generator=gen)
    top = torch.where(found, torch.floor(u[0] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    left = torch.where(found, torch.floor(u[1] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    return torch.stack([left, top, left + w, top + h], 1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, index: torch.Tensor | None = None):
    """Crop box ``k`` of image ``index[k]`` (``k`` by default) and resize it to ``size`` x ``size``: one
    ``roi_align`` for the batch (bilinear; adaptive sampling averages over each output pixel when shrinking)."""
    if index is None:
        index = torch.arange(len(boxes), device=boxes.device)
    rois = torch.cat([index.to(boxes.dtype)[:, None], boxes], 1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def flip(images: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Horizontal flip with probability ``p`` per sample."""
    chosen = _chance(len(images), p, gen, images.device)
    return torch.where(chosen[:, None, None, None], images.flip(-1), images)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` luma."""
    return (images * images.new_tensor(GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _blend(images, other, factor):
    return (factor.view(-1, 1, 1, 1) * images + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift[b]`` turns, through HSV (as torchvision's ``adjust_hue``)."""
    value, _ = images.max(1, keepdim=True)
    low, _ = images.min(1, keepdim=True)
    chroma = value - low
    sat = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    c = chroma.clamp_min(1e-12)
    r, g, b = images.unbind(1)
    r, g, b = r[:, None], g[:, None], b[:, None]
    hue = torch.where(value == r, (g - b) / c, torch.where(value == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))  # in sixths of a turn
    hue = torch.remainder(hue + 6 * shift.view(-1, 1, 1, 1), 6)
    # HSV -> RGB: channel n (5 red, 3 green, 1 blue) = V - V*S*clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6
    n = images.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + hue, 6)
    return value - value * sat * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(
    images: torch.Tensor,
    gen: torch.Generator,
    host: random.Random,
    p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
):
    """torchvision's ``RandomApply([ColorJitter(...)], p)`` per sample: factors drawn per sample from
    ``[1 - x, 1 + x]`` (hue from ``[-hue, hue]``), the four jitters in an order drawn per batch from ``host`` (a
    host-side generator: reading an order drawn on a GPU back would stall the host until the GPU caught up)."""
    n, device = len(images), images.device
    factors = {
        "brightness": _uniform(n, 1 - brightness, 1 + brightness, gen, device),
        "contrast": _uniform(n, 1 - contrast, 1 + contrast, gen, device),
        "saturation": _uniform(n, 1 - saturation, 1 + saturation, gen, device),
        "hue": _uniform(n, -hue, hue, gen, device),
    }
    chosen = _chance(n, p, gen, device)
    order = host.sample(range(4), 4)
    out = images
    for i in order:
        if i == 0:
            out = (out * factors["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
        elif i == 1:
            mean = grayscale(out).mean((1, 2, 3), keepdim=True)
            out = _blend(out, mean, factors["contrast"])
        elif i == 2:
            out = _blend(out, grayscale(out), factors["saturation"])
        else:
            out = adjust_hue(out, factors["hue"])
    return torch.where(chosen[:, None, None, None], out, images)


def random_grayscale(images: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    chosen = _chance(len(images), p, gen, images.device)
    return torch.where(chosen[:, None, None, None], grayscale(images).expand_as(images), images)


def gaussian_blur(images: torch.Tensor, gen: torch.Generator, p: float, kernel: int, sigma=(0.1, 2.0)) -> torch.Tensor:
    """torchvision's ``RandomApply([GaussianBlur(kernel, sigma)], p)`` per sample: a separable Gaussian of a
    per-sample sigma, reflect padding, as one grouped convolution per axis."""
    n, c, h, w = images.shape
    chosen = _chance(n, p, gen, images.device)
    s = _uniform(n, sigma[0], sigma[1], gen, images.device)
    x = torch.arange(kernel, device=images.device, dtype=images.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (x[None] / s[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, kernel]
    pad = kernel // 2
    flat = F.pad(images.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, kernel), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return torch.where(chosen[:, None, None, None], flat.view(n, c, h, w), images)


def solarize(images: torch.Tensor, gen: torch.Generator, p: float, threshold: float = 128 / 255) -> torch.Tensor:
    chosen = _chance(len(images), p, gen, images.device)
    return torch.where(chosen[:, None, None, None] & (images >= threshold), 1 - images, images)


# --- the training views of a batch ---------------------------------------------------------------------------------


class BatchViews:
    """The training views of a uint8 batch ``[B, 3, H, W]``: MAE's single view (``views=None``: RandomResizedCrop
    scale ``scale`` + flip + normalise) or iBOT's multi-crop (``views``: the method's ``train_views``, as
    :class:`~mimzoo.data.MultiCrop` takes them), on the batch's device, drawn from ``gen``."""

    def __init__(self, image_size: int, mean, std, views: dict | None = None, scale=(0.2, 1.0)):
        self.image_size, self.views, self.scale = image_size, views, tuple(scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)

    def _crops(self, images, gen, count: int, size: int, scale) -> torch.Tensor:
        """``count`` crops of every image, crop-major: ``[count * B, 3, size, size]`` in [0, 1], flipped."""
        b, _, h, w = images.shape
        boxes = crop_boxes(count * b, h, w, scale, gen, images.device)
        index = torch.arange(b, device=images.device).repeat(count)
        return flip(resized_crop(images, boxes, size, index) / 255, gen)

    def _colour(self, x, gen, host, blur_p: float, size: int, solarize_p: float = 0.0):
        x = random_grayscale(color_jitter(x, gen, host), gen)
        if self.views.get("blur", True) and blur_p > 0:
            x = gaussian_blur(x, gen, blur_p, max(3, int(0.1 * size) // 2 * 2 + 1))
        if solarize_p > 0:
            x = solarize(x, gen, solarize_p)
        return self._normalize(x)

    def __call__(self, images: torch.Tensor, gen: torch.Generator, host: random.Random):
        """MAE: ``[B, 3, S, S]`` float; multi-crop: the list ``[global_1, global_2, local_1, ...]``. ``gen`` (on
        the images' device) draws per-sample parameters, ``host`` the per-batch order of the colour jitters."""
        images = images.float()
        if self.views is None:
            return self._normalize(self._crops(images, gen, 1, self.image_size, self.scale))
        v, b = self.views, len(images)
        g1, g2 = self._crops(images, gen, 2, self.image_size, v.get("global_scale", (0.14, 1.0))).split(b)
        out = [
            self._colour(g1, gen, host, 1.0, self.image_size),
            self._colour(g2, gen, host, 0.1, self.image_size, 0.2),
        ]
        local = v.get("local_number", 0)
        if local:
            size = v["local_size"]
            crops = self._crops(images, gen, local, size, v.get("local_scale", (0.05, 0.4)))
            out += list(self._colour(crops, gen, host, 0.5, size).split(b))
        return out


class DeviceBatches(Dataset):
    """Item ``(epoch, batch index, sample indices)`` (from :class:`ResumableBatchSampler`): the augmented views of
    those samples and their labels, on the device that holds ``images``, drawn from a generator seeded from
    ``(seed, epoch, batch index, rank)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, views: BatchViews, seed: int, rank: int = 0):
        self.images, self.labels, self.views, self.seed, self.rank = images, labels, views, seed, rank

    def __len__(self):
        return len(self.images)

    def generators(self, epoch: int, batch: int) -> tuple[torch.Generator, random.Random]:
        """The batch's generator on the device and its host-side companion, both from its position."""
        seed = derive_seed(self.seed, DEVICE_AUGMENTATION, epoch, batch, self.rank)
        return torch.Generator(device=self.images.device).manual_seed(seed), random.Random(seed)

    def __getitem__(self, item):
        epoch, batch, indices = item
        index = torch.as_tensor(indices, dtype=torch.long).to(self.images.device, non_blocking=True)
        return self.views(self.images[index], *self.generators(epoch, batch)), self.labels[index]


class ResumableBatchSampler(ResumableSampler):
    """:class:`ResumableSampler`'s order and shard, cut into batches of ``batch_size``: yields
    ``(epoch, batch index in the epoch, sample indices)``; ``start`` counts batches here. Its length is the
    whole epoch's batch count, as the PIL loader's."""

    def __init__(self, dataset, batch_size: int, drop_last: bool = True, **kwargs):
        start = kwargs.pop("start", 0)
        super().__init__(dataset, **kwargs)
        self.batch_size, self.drop_last, self.start_batch = batch_size, drop_last, start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        super().set_epoch(epoch)

    def __len__(self) -> int:
        size = super().__len__()
        return size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)

    def __iter__(self):
        shard = [i for _, i in super().__iter__()]
        for batch in range(self.start_batch, len(self)):
            yield self.epoch, batch, shard[batch * self.batch_size : (batch + 1) * self.batch_size]
