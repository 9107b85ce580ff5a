"""One LightningModule per method, each in its own file over the shared base (``base.py``: the contract).

Every module of this package is imported here and every :class:`MIMMethod` subclass it defines is
exported, so a new method is one new file: ``mimzoo.methods.<Class>`` names it in a model config.
"""

import importlib
import pkgutil

from .base import MIMMethod, MIMOutput  # noqa: F401  (re-exported)


def _subclasses(cls) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update({cls.__name__: cls for cls in _subclasses(MIMMethod) if cls.__module__.startswith(__name__)})
__all__ = sorted({"MIMMethod", "MIMOutput", *(cls.__name__ for cls in _subclasses(MIMMethod))})
