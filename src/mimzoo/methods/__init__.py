"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .dvae import DVAE
from .mae import MAE
from .beit import BEiT
from .sgmae import SGMAE

__all__ = ["BEiT", "DVAE", "MAE", "MIMMethod", "MIMOutput", "SGMAE"]
