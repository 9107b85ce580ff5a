"""The tokenizer interface BEiT's stage 2 relies on: dataset-normalised images in, code ids out.

Stage 2 does not care where codes come from: our own dVAE (:class:`DVAETokenizer`, read from a
checkpoint by ``mimzoo.methods.dvae.load_tokenizer``) or OpenAI's DALL-E encoder fill the same
:class:`Tokenizer`.
Each tokenizer undoes the dataset normalisation itself and resizes to its own input size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .dvae import DiscreteVAE


class Tokenizer(nn.Module):
    """``num_tokens`` codes; ``downsample`` tokenizer-input pixels per code along a side."""

    num_tokens: int
    downsample: int

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def input_size(self, image_size) -> tuple[int, int]:
        """The size the tokenizer resizes an ``image_size`` image to (default: unchanged)."""
        return _pair(image_size)

    def grid_size(self, image_size) -> tuple[int, int]:
        h, w = self.input_size(image_size)
        return h // self.downsample, w // self.downsample

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, num_tokens, h, w]`` for pixels in [0, 1] at ``input_size``."""
        raise NotImplementedError

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised ``[B, 3, H, W]`` -> argmax code ids ``[B, h*w]`` (row-major), in eval mode."""
        self.eval()
        pixels = (images.float() * self.std + self.mean).clamp(0, 1)
        size = self.input_size(tuple(images.shape[-2:]))
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return self.logits(pixels).argmax(1).flatten(1)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class DVAETokenizer(Tokenizer):
    """mimzoo's own trained dVAE (encoder + argmax); resizes to the size it was trained on."""

    def __init__(
        self, vae: DiscreteVAE, image_size: int | None = None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    ):
        super().__init__(mean, std)
        self.vae = vae
        self.num_tokens, self.downsample = vae.num_tokens, vae.downsample
        self.image_size = image_size

    def input_size(self, image_size) -> tuple[int, int]:
        return _pair(self.image_size or image_size)

    def logits(self, pixels):
        return self.vae.logits(pixels)


class DALLETokenizer(Tokenizer):
    """OpenAI's DALL-E encoder (``encoder.pkl``, 8192 codes, down-sampling 8) on half-size inputs
    (112px for 224px images, as BEiT) with DALL-E's ``map_pixels`` (x -> 0.8x + 0.1)."""

    num_tokens, downsample = 8192, 8

    def __init__(self, path, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        super().__init__(mean, std)
        file = Path(path) / "encoder.pkl"
        try:
            import dall_e
        except ImportError as err:
            raise ImportError("the dalle tokenizer needs OpenAI's DALL-E package: `pip install DALL-E`") from err
        if not file.is_file():
            raise FileNotFoundError(
                f"no DALL-E encoder at {file}; download https://cdn.openai.com/dall-e/encoder.pkl "
                "into that folder (or use a mimzoo dVAE: {'kind': 'dvae', 'ckpt': ...})"
            )
        self.encoder = dall_e.load_model(str(file), "cpu")

    def input_size(self, image_size):
        h, w = _pair(image_size)
        return h // 2, w // 2

    def logits(self, pixels):
        return self.encoder(0.8 * pixels + 0.1)
