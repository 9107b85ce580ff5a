"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .mae import MAE
from .beit import BEiT

__all__ = ["BEiT", "MAE", "MIMMethod", "MIMOutput"]
