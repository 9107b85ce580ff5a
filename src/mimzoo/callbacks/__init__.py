"""Training callbacks shared by every method."""

from .informed_masks import InformedMaskPanels
from .log_interval import LogIntervalFit
from .reconstruction import ReconstructionPanels

__all__ = ["InformedMaskPanels", "LogIntervalFit", "ReconstructionPanels"]
