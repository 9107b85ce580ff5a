"""SimMIM (Xie et al., CVPR 2022): mask tokens in, a one-layer linear head out, L1 on masked pixels.

Follows microsoft/SimMIM ``models/simmim.py`` with its ViT (``models/vision_transformer.py``, BEiT's
ViT: one relative position bias table shared by every layer, layer scale 0.1, no absolute
positions): masked patch embeddings become a learned mask token and every position goes through the
encoder; the final-norm patch tokens, as a ``[B, D, h, w]`` map, go through a 1x1 convolution to
``stride^2 * C`` values and a pixel shuffle (the linear prediction head); the loss is the mean
absolute error to the dataset-normalised image over masked pixels (summed, divided by the masked
pixel count plus 1e-5 and by the channel count). Masks are random over cells of 32 px (2 x 2 patches
of 16 px), ratio 0.6, from the registry's ``random`` strategy with ``cell``.

Official quirks kept: the decoder convolution keeps PyTorch's default init; weight decay applies to
every matrix but ``cls_token``/``pos_embed``, so the mask token and the shared relative position table
are decayed. One difference: the registry masks ``round(ratio * cells)`` cells, SimMIM's generator
``ceil``: the same for 192 px inputs (22 of 36), 29 instead of 30 of 49 at 224 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimzoo.nn import BEiTEncoder

from .base import MIMMethod, MIMOutput


class SimMIM(MIMMethod):
    """``encoder``: :class:`~mimzoo.nn.BEiTEncoder` sizes; the remaining arguments are SimMIM's ViT options."""

    reconstructs = True
    default_mask = {"name": "random", "ratio": 0.6, "cell": 2}

    def __init__(
        self,
        encoder: dict,
        mask: dict | None = None,
        optim: dict | None = None,
        layer_scale_init: float | None = 0.1,
        use_abs_pos_emb: bool = False,
        use_shared_rel_pos_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(mask=mask, optim=optim)
        self.save_hyperparameters()
        self.encoder = BEiTEncoder(
            **{
                "layer_scale_init": layer_scale_init,
                "use_abs_pos_emb": use_abs_pos_emb,
                "use_shared_rel_pos_bias": use_shared_rel_pos_bias,
                "drop_path_rate": drop_path_rate,
                **encoder,
            }
        )
        stride, channels = self.encoder.stride, self.encoder.in_chans
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.embed_dim, stride**2 * channels, kernel_size=1), nn.PixelShuffle(stride)
        )

    def forward(self, images, mask=None):
        mask = self.resolve_mask(images, mask)
        tokens = self.encoder.forward_masked(images, mask)[:, self.encoder.num_prefix_tokens :]
        (h, w), (b, _, d) = self.grid_size, tokens.shape
        pred = self.decoder(tokens.transpose(1, 2).reshape(b, d, h, w)).float()  # [B, C, H, W]
        pixels = self.pixel_mask(mask)
        per_pixel = F.l1_loss(images.float(), pred, reduction="none")
        loss = (per_pixel * pixels).sum() / (pixels.sum() + 1e-5) / images.shape[1]
        return MIMOutput(loss=loss, mask=mask, pred=pred)

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` patch mask -> ``[B, 1, H, W]`` float pixel mask (1 = masked)."""
        (h, w), p = self.grid_size, self.encoder.stride
        grid = mask.view(-1, h, w)
        return grid.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()

    def reconstruct(self, images: torch.Tensor, out: MIMOutput) -> torch.Tensor:
        """Visible pixels as they are, predicted ones where the mask is."""
        return torch.where(self.pixel_mask(out.mask).bool(), out.pred, images.float())

    def no_weight_decay(self) -> set[str]:
        """SimMIM's list: only ``cls_token`` and ``pos_embed`` (besides biases and norms, which the base
        always spares); the mask token and relative position tables are decayed."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("cls_token", "pos_embed")}
