"""ConvMAE's multi-scale mask: one mask on the coarsest (stage-3) grid, repeated onto finer grids.

Drawing once and upsampling keeps every finer-stage cell inside one stage-3 patch fully masked or
fully visible, which is what keeps masked pixels out of the encoder (Alpha-VL/ConvMAE ``models_convmae.py``
repeats the mask the same way; a finer grid in another patch order would leak masked pixels).
"""

from __future__ import annotations

import torch

from .registry import build, register_mask


@register_mask("multiscale")
class MultiScaleMask:
    """Wraps any ``base`` strategy (``{"name": "random"}`` by default) and draws at the grid it is given,
    the stage-3 grid; ConvMAE's encoder upsamples the result per stage with :func:`~mimzoo.masking.mask_pyramid`.

    ``ratio`` is the masked fraction of stage-3 patches, hence of every finer stage too (upsampling
    preserves it); it is passed on to the base strategy (whose own ``ratio``, if any, must agree), as is ``cell``.
    """

    def __init__(self, base: dict | str | None = None, ratio: float | None = None, cell: int | None = None):
        base = dict(base or {"name": "random"}) if not isinstance(base, str) else {"name": base}
        if base.get("name") == "multiscale":
            raise ValueError("multiscale cannot wrap itself; give a base strategy such as {name: random}")
        if ratio is not None:
            if base.get("ratio") not in (None, ratio):
                raise ValueError(f"mask.ratio={ratio} contradicts mask.base.ratio={base['ratio']}; set one of them")
            base["ratio"] = ratio
        if cell is not None:
            base["cell"] = cell
        self.base = build(base.pop("name"), **base)
        self.ratio = self.base.ratio

    @property
    def exact_count(self) -> bool:
        return self.base.exact_count

    def count(self, grid_size: tuple[int, int]) -> int | None:
        return self.base.count(grid_size)

    def __call__(self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None = None):
        return self.base(batch_size, grid_size, generator=generator)

    def __repr__(self):
        return f"MultiScaleMask(base={self.base!r})"
