"""Mask strategies, one registry for every method (see DESIGN.md, "The mask contract")."""

from .registry import MaskStrategy, available, build, fill_to_count, mask_to_ids, num_masked, register_mask
from . import strategies  # noqa: F401  (registers the built-in strategies)
from .multiscale import mask_pyramid, upsample_mask

__all__ = ["MaskStrategy", "available", "build", "fill_to_count", "mask_pyramid", "mask_to_ids", "num_masked",
           "register_mask", "upsample_mask"]
