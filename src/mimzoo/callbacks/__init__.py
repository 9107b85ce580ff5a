"""Training callbacks shared by every method."""

from .cost import RunCost
from .informed_masks import InformedMaskPanels
from .log_interval import LogIntervalFit
from .reconstruction import ReconstructionPanels
from .sync_free import LoggedStepsProgressBar, LoggedThroughput

__all__ = [
    "RunCost",
    "InformedMaskPanels",
    "LogIntervalFit",
    "LoggedStepsProgressBar",
    "LoggedThroughput",
    "ReconstructionPanels",
]
