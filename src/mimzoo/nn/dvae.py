"""A small convolutional discrete VAE (BEiT's tokenizer stage, after DALL-E / DALLE-pytorch).

Encoder: ``log2(downsample)`` x [4x4 conv stride 2, ReLU, residual blocks], then a 1x1 conv to
``num_tokens`` logits per position. A code vector is a (relaxed) one-hot over the codebook times
the codebook; the decoder mirrors the encoder with 4x4 transposed convs back to pixels in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """Identity plus [3x3, ReLU, 3x3, ReLU, 1x1], as in DALLE-pytorch's dVAE."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x):
        return x + self.net(x)


def _stage(conv: nn.Module, dim: int, num_resblocks: int) -> list[nn.Module]:
    return [conv, nn.ReLU(), *(ResBlock(dim) for _ in range(num_resblocks))]


class DiscreteVAE(nn.Module):
    """``logits(x)``: ``[B, num_tokens, h, w]`` for pixels ``x`` in [0, 1]; ``decode(soft)``: pixels
    from a (soft) one-hot map ``[B, num_tokens, h, w]``; ``decode_ids``: pixels from code ids."""

    def __init__(
        self,
        num_tokens: int = 8192,
        downsample: int = 4,
        hidden_dim: int = 64,
        code_dim: int = 256,
        num_resblocks: int = 1,
        in_chans: int = 3,
    ):
        super().__init__()
        num_layers = int(round(math.log2(downsample)))
        if downsample < 2 or 2**num_layers != downsample:
            raise ValueError(f"downsample must be a power of 2 (>= 2), got {downsample}")
        self.num_tokens, self.downsample, self.code_dim = num_tokens, downsample, code_dim
        enc: list[nn.Module] = []
        for i in range(num_layers):
            enc += _stage(nn.Conv2d(in_chans if i == 0 else hidden_dim, hidden_dim, 4, 2, 1), hidden_dim, num_resblocks)
        self.encoder = nn.Sequential(*enc, nn.Conv2d(hidden_dim, num_tokens, 1))
        self.codebook = nn.Embedding(num_tokens, code_dim)
        dec: list[nn.Module] = [nn.Conv2d(code_dim, hidden_dim, 1)]
        for _ in range(num_layers):
            dec += _stage(nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, 2, 1), hidden_dim, num_resblocks)
        self.decoder = nn.Sequential(*dec, nn.Conv2d(hidden_dim, in_chans, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x * 2 - 1)  # centred input; pixels themselves stay in [0, 1]

    def decode(self, soft_one_hot: torch.Tensor) -> torch.Tensor:
        codes = torch.einsum("bkhw,kd->bdhw", soft_one_hot, self.codebook.weight)
        return self.decoder(codes)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codebook(ids).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor, tau: float = 1.0, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, logits)``: Gumbel-softmax codes in training, argmax codes in eval."""
        logits = self.logits(x)
        if self.training:
            soft = F.gumbel_softmax(logits, tau=tau, hard=hard, dim=1)
            return self.decode(soft), logits
        return self.decode_ids(logits.argmax(1)), logits


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logits) || Uniform)`` over dim 1 (the codes), averaged over batch and positions."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1).mean()
