"""One LightningModule per method over a shared base."""

from .base import MIMMethod, MIMOutput
from .dvae import DVAE
from .mae import MAE
from .beit import BEiT
from .ibot import iBOT
from .teacher_student import TeacherStudentMethod

__all__ = ["BEiT", "DVAE", "MAE", "MIMMethod", "MIMOutput", "TeacherStudentMethod", "iBOT"]
