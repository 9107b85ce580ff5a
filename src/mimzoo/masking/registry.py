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
    every sample gets exactly ``round(ratio * L)`` masked patches (what token-dropping encoders need).

    ``cell``: draw on a grid of ``cell x cell``-patch cells and mask whole cells (SimMIM masks 32 px
    cells of 16 px patches: ``cell=2``); the ratio and the exact count then hold in cells."""

    exact_count = True

    def __init__(self, ratio: float = 0.75, cell: int = 1):
        ratio = float(ratio)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}; e.g. mask.ratio=0.75")
        if int(cell) < 1:
            raise ValueError(f"mask.cell must be a positive number of patches, got {cell}")
        self.ratio, self.cell = ratio, int(cell)

    def __call__(self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None = None):
        h, w = grid_size
        if h % self.cell or w % self.cell:
            raise ValueError(f"mask.cell={self.cell} does not divide the {h}x{w} patch grid; pick a cell size that "
                             "divides it (mask.cell=1 masks single patches)")
        h, w = h // self.cell, w // self.cell
        k = num_masked(self.ratio, h * w)
        if k == 0 or k == h * w:
            raise ValueError(
                f"mask ratio {self.ratio} on a {h}x{w} grid masks {k} of {h * w} cells; "
                "choose a ratio that leaves at least one cell visible and one masked"
            )
        mask = self.sample(batch_size, h, w, k, generator)
        assert mask.shape == (batch_size, h * w) and mask.dtype == torch.bool
        return upsample_mask(mask, (h, w), self.cell) if self.cell > 1 else mask

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


def upsample_mask(mask: torch.Tensor, grid_size: tuple[int, int], scale: int) -> torch.Tensor:
    """``[B, h*w]`` -> ``[B, (s*h)*(s*w)]``: each patch becomes an ``s x s`` block, both row-major
    (fine cell ``(r, c)`` takes coarse patch ``(r // s, c // s)``)."""
    b, (h, w) = mask.shape[0], grid_size
    if mask.shape[1] != h * w:
        raise ValueError(f"mask has {mask.shape[1]} patches, grid {h}x{w} has {h * w}")
    return mask.view(b, h, 1, w, 1).expand(b, h, scale, w, scale).reshape(b, h * scale * w * scale)


def mask_pyramid(mask: torch.Tensor, grid_size: tuple[int, int], scales) -> list[torch.Tensor]:
    """The mask upsampled by each of ``scales``, as ``[B, s*h, s*w]`` maps (True = masked)."""
    h, w = grid_size
    return [upsample_mask(mask, grid_size, s).view(mask.shape[0], s * h, s * w) for s in scales]


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
