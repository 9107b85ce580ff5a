"""The one mask registry every method draws from, and the shared mask helpers.

A strategy is a callable ``strategy(batch_size, grid_size=(h, w), generator=None) -> bool [B, h*w]``
(True = masked). Strategies honour ``ratio`` exactly: ``round(ratio * L)`` patches masked in every
sample, so MAE-style encoders can drop a fixed number of tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

_REGISTRY: dict[str, Callable] = {}


def register_mask(name: str):
    """Class/function decorator that adds a strategy to the registry under ``name``."""

    def deco(obj):
        if name in _REGISTRY:
            raise ValueError(f"mask strategy {name!r} is registered twice")
        _REGISTRY[name] = obj
        return obj

    return deco


def available() -> list[str]:
    """Names of every registered strategy."""
    return sorted(_REGISTRY)


def build(name: str, **params):
    """Instantiate the strategy ``name`` with its parameters (e.g. ``ratio=0.75``)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown mask strategy {name!r}; known strategies: {', '.join(available())}")
    return _REGISTRY[name](**params)


def num_masked(ratio: float, num_patches: int) -> int:
    """The exact masked count every strategy honours: ``round(ratio * L)``."""
    return int(round(ratio * num_patches))


class MaskStrategy:
    """Base class: checks the ratio and turns the grid size into ``L``. ``exact_count`` says whether
    every sample gets exactly ``round(ratio * L)`` masked patches (what token-dropping encoders need)."""

    exact_count = True

    def __init__(self, ratio: float = 0.75):
        ratio = float(ratio)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}; e.g. mask.ratio=0.75")
        self.ratio = ratio

    def __call__(self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None = None):
        h, w = grid_size
        k = num_masked(self.ratio, h * w)
        if k == 0 or k == h * w:
            raise ValueError(
                f"mask ratio {self.ratio} on a {h}x{w} grid masks {k} of {h * w} patches; "
                "choose a ratio that leaves at least one patch visible and one masked"
            )
        mask = self.sample(batch_size, h, w, k, generator)
        assert mask.shape == (batch_size, h * w) and mask.dtype == torch.bool
        return mask

    def sample(self, batch_size: int, h: int, w: int, k: int, generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def fill_to_count(mask: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Make every row of a bool mask ``[B, L]`` have exactly ``k`` True entries.

    Rows with too few get random extra patches, rows with too many lose random ones; the shape a
    strategy drew is kept as far as the count allows.
    """
    score = torch.rand(mask.shape, generator=generator)
    # Masked patches rank first (score in [1, 2)), then unmasked ones at random; keep the top k.
    order = torch.argsort(score + mask.float(), dim=1, descending=True)
    out = torch.zeros_like(mask)
    out.scatter_(1, order[:, :k], True)
    return out


def mask_to_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive ``(ids_keep, ids_restore)`` from a bool mask with the same count in every row.

    ``ids_keep[b]`` lists the visible positions in grid order; ``ids_restore`` un-shuffles the
    sequence ``[visible..., masked...]`` back to grid order (MAE's convention).
    """
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            "MAE-style encoders drop masked tokens and need the same masked count in every sample; "
            f"got counts {sorted(set(counts.tolist()))}"
        )
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    num_keep = mask.shape[1] - int(counts[0])
    return ids_shuffle[:, :num_keep], ids_restore
