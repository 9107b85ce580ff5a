"""Training callbacks shared by every method."""

from .reconstruction import ReconstructionPanels

__all__ = ["ReconstructionPanels"]
