"""The one mask registry every method draws from, and the shared mask helpers.

A strategy is a callable ``strategy(batch_size, grid_size=(h, w), generator=None) -> bool [B, h*w]``
(True = masked). Strategies honour ``ratio`` exactly: ``round(ratio * L)`` patches masked in every
sample, so MAE-style encoders can drop a fixed number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable

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
            raise ValueError(
                f"mask.cell={self.cell} does not divide the {h}x{w} patch grid; pick a cell size that "
                "divides it (mask.cell=1 masks single patches)"
            )
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

    def count(self, grid_size: tuple[int, int]) -> int | None:
        """Masked patches per image on ``grid_size`` when every image gets the same number (``exact_count``),
        else None: what a token-dropping encoder keeps without reading the mask back to the host."""
        if not self.exact_count:
            return None
        h, w = grid_size
        return num_masked(self.ratio, (h // self.cell) * (w // self.cell)) * self.cell**2

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


def shuffle_ids(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the visible positions in grid order, then the masked ones (a stable sort of the mask)."""
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)


def restore_ids(mask: torch.Tensor) -> torch.Tensor:
    """``ids_restore`` of :func:`mask_to_ids` alone: it needs no count, so it reads nothing on the host."""
    return torch.argsort(shuffle_ids(mask), dim=1)


def mask_to_ids(mask: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive ``(ids_keep, ids_restore)`` from a bool mask with the same count in every row.

    ``ids_keep[b]`` lists the visible positions in grid order; ``ids_restore`` un-shuffles the
    sequence ``[visible..., masked...]`` back to grid order (MAE's convention).

    ``num_masked``: the masked count per row when the caller knows it (the strategy that drew the mask
    does): nothing is read back to the host, so no GPU sync and no ``torch.compile`` graph break; the
    count is checked on the device (``torch._assert_async``: at once on the CPU, at the next sync on a
    GPU). Without it the count is read from the mask (a host read) and checked with a ``ValueError``.
    """
    ids_shuffle = shuffle_ids(mask)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    counts = mask.sum(1)
    if num_masked is None:
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                "MAE-style encoders drop masked tokens and need the same masked count in every sample; "
                f"got counts {sorted(set(counts.tolist()))}"
            )
        num_masked = int(counts[0])
    else:
        torch._assert_async(
            (counts == num_masked).all(),
            f"MAE-style encoders drop masked tokens: every sample must mask {num_masked} patches",
        )
    return ids_shuffle[:, : mask.shape[1] - num_masked], ids_restore


def masked_index(mask: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Flat positions ``[M]`` of the masked entries of ``mask`` (row-major, as ``x[mask]`` takes them), on
    ``device``. Computed where the mask is: for a mask drawn on the CPU that needs no GPU sync (on a GPU,
    ``nonzero`` and boolean indexing wait for the device to learn ``M``)."""
    index = mask.flatten().nonzero().squeeze(1)
    return index if device is None else to_device(index, device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without a host sync: a CPU tensor bound for a GPU goes through pinned memory
    with ``non_blocking=True`` (a plain ``.to(device)`` waits for the GPU's queue to drain). A copy to the
    CPU blocks, as it must: the host is about to read it."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cpu":
        return tensor.to(device)
    if tensor.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_available():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
