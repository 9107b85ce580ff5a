"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .dvae import DVAE
from .mae import MAE
from .beit import BEiT
from .convmae import ConvMAE

__all__ = ["BEiT", "ConvMAE", "DVAE", "MAE", "MIMMethod", "MIMOutput"]
