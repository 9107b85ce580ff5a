"""mimzoo: masked image modeling (MAE, BEiT, iBOT, ConvMAE, Self-Guided MAE) under one roof."""

__version__ = "0.1.0"


def load_official(method: str, path, **model_overrides):
    """Load an official repository's checkpoint into the matching mimzoo module (see mimzoo.checkpoints)."""
    from mimzoo.checkpoints import load_official as _load

    return _load(method, path, **model_overrides)


def load_pretrained(path):
    """Load any mimzoo checkpoint back into its method's module."""
    from mimzoo.checkpoints import load_pretrained as _load

    return _load(path)


def load_exported(path):
    """The timm model of a ``mimzoo-export`` file (``vit.pth`` with ``vit.pth.json`` beside it), weights loaded."""
    from mimzoo.checkpoints import load_exported as _load

    return _load(path)
