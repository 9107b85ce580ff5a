"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .dvae import DVAE
from .mae import MAE
from .beit import BEiT
from .convmae import ConvMAE
from .ibot import iBOT
from .sgmae import SGMAE
from .teacher_student import TeacherStudentMethod

__all__ = ["BEiT", "ConvMAE", "DVAE", "MAE", "MIMMethod", "MIMOutput", "SGMAE", "TeacherStudentMethod", "iBOT"]
