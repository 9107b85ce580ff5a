"""Training callbacks shared by every method."""

from .informed_masks import InformedMaskPanels
from .reconstruction import ReconstructionPanels

__all__ = ["InformedMaskPanels", "ReconstructionPanels"]
