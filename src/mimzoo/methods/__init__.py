"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .mae import MAE

__all__ = ["MAE", "MIMMethod", "MIMOutput"]
