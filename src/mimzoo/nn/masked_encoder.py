"""The one interface every mimzoo encoder implements, whatever its architecture.

A method hands an encoder images and a bool mask ``[B, N]`` over the encoder's patch grid (True =
masked) and gets final-norm tokens back. What happens to masked patches is the encoder's kind:

* ``drops_masked = True`` (MAE, ConvMAE, SG-MAE): masked tokens are removed before the blocks;
  every row must mask the same number of patches (the mask strategy's ``exact_count``). The caller
  passes that number as ``num_masked`` when it knows it (the strategy that drew the mask does): then
  nothing is read back from the mask to the host (no GPU sync, no ``torch.compile`` graph break).
* ``drops_masked = False`` (BEiT, iBOT, SimMIM): masked patch embeddings are replaced by a learned
  mask token and every position goes through the blocks.

Either way no pixel of a masked patch reaches any output. The same object also gives the pooled
feature probes use and exports itself as a plain timm model.
"""

from __future__ import annotations

import torch
from torch import nn

from mimzoo.masking.registry import to_device


class MaskedEncoder(nn.Module):
    """Mixin declaring the contract; the concrete encoders subclass it next to their timm base.

    What a subclass provides (as attributes or properties): ``drops_masked``; ``grid`` ``(h, w)``, the
    patch grid a mask is drawn on; ``stride``, pixels per grid cell along a side (the patch size;
    ConvMAE: the product of its stages'); ``num_prefix_tokens`` (``[CLS]`` and the like in front of the
    patch tokens); ``embed_dim``; ``in_chans``; and :meth:`forward_masked` and :meth:`export_timm`.
    """

    drops_masked: bool
    grid: tuple[int, int]
    stride: int
    num_prefix_tokens: int
    embed_dim: int
    in_chans: int

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.stride, self.grid[1] * self.stride

    def forward_masked(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, num_masked: int | None = None
    ) -> torch.Tensor:
        """Final-norm tokens ``[B, num_prefix_tokens + K, D]``: ``K`` is the visible count for a dropping
        encoder (visible patches in grid order), ``N`` otherwise; ``mask=None`` keeps every patch.
        ``num_masked`` (masked patches per image, if known; checked on the device) spares a dropping encoder
        reading the count from the mask; a replacing encoder ignores it."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per unmasked image ``[B, D]``: exactly what the exported timm model returns."""
        return self.forward_masked(images)[:, 0]

    def export_timm(self) -> tuple[dict, dict]:
        """``(kwargs, state_dict)``: ``timm.create_model(**kwargs)`` builds this encoder as a plain timm
        model (no head) that loads ``state_dict`` with ``strict=True``."""
        raise NotImplementedError

    def check_mask(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask, on the images' device (copied without a host sync), after checking its type and shape
        against the grid."""
        expected = (images.shape[0], self.grid[0] * self.grid[1])
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
        return to_device(mask, images.device)


def state_for_export(module: nn.Module, drop: tuple[str, ...] = ()) -> dict:
    """A detached CPU copy of ``module``'s state dict without the keys starting with ``drop``."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.startswith(drop)}
