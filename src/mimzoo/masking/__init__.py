"""Mask strategies, one registry for every method (the contract: ``registry.py``, and "Masks" in the README)."""

from . import (
    multiscale,  # noqa: F401  (registers multiscale)
    strategies,  # noqa: F401  (registers the built-in strategies)
)
from .registry import (
    MaskStrategy,
    available,
    build,
    fill_to_count,
    mask_pyramid,
    mask_to_ids,
    masked_index,
    num_masked,
    register_mask,
    restore_ids,
    shuffle_ids,
    to_device,
    upsample_mask,
)
from .self_guided import Bipartition, InformedMask, SelfGuidedMask, choose_object, ncut_bipartition

__all__ = [
    "Bipartition",
    "InformedMask",
    "MaskStrategy",
    "SelfGuidedMask",
    "available",
    "build",
    "choose_object",
    "fill_to_count",
    "mask_pyramid",
    "mask_to_ids",
    "masked_index",
    "ncut_bipartition",
    "num_masked",
    "register_mask",
    "restore_ids",
    "shuffle_ids",
    "to_device",
    "upsample_mask",
]
