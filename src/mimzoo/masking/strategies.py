"""The mask strategies every method shares: random (MAE), block (BEiT), grid and center."""

from __future__ import annotations

import math

import torch

from .registry import MaskStrategy, fill_to_count, register_mask


def _uniform(lo: float, hi: float, generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator) -> int:
    """Uniform integer in [lo, hi], both inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


@register_mask("random")
class RandomMask(MaskStrategy):
    """MAE's per-sample random shuffle: uniform over positions, without replacement
    (facebookresearch/mae ``models_mae.py``, ``random_masking``)."""

    def sample(self, batch_size, h, w, k, generator):
        noise = torch.rand(batch_size, h * w, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first L - k are kept, as in MAE
        mask = torch.zeros(batch_size, h * w, dtype=torch.bool)
        mask.scatter_(1, ids_shuffle[:, h * w - k :], True)
        return mask


@register_mask("block")
class BlockMask(MaskStrategy):
    """BEiT's blockwise masking (Algorithm 1 of the BEiT paper, unilm ``masking_generator.py``).

    Rectangles of at least ``min_num_patches`` patches with a log-uniform aspect ratio in
    ``[min_aspect, max_aspect]`` are added until the target count is reached. With ``exact`` (the
    default, needed by MAE-style encoders) rows BEiT's loop leaves short are topped up with random
    patches; with ``exact=False`` the raw BEiT output (at most the target count) is returned.
    """

    def __init__(
        self,
        ratio: float = 0.4,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = True,
        cell: int = 1,
    ):
        super().__init__(ratio, cell)
        max_aspect = max_aspect or 1.0 / min_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"block mask needs 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        if min_num_patches < 1:
            raise ValueError(f"block mask needs min_num_patches >= 1, got {min_num_patches}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = max_num_patches
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.exact = exact

    def block_shape(self, budget: int, generator) -> tuple[int, int]:
        """A candidate block: area ~ U(min_num_patches, budget), aspect log-uniform in the bounds."""
        area = _uniform(min(self.min_num_patches, budget), budget, generator)
        aspect = math.exp(_uniform(math.log(self.min_aspect), math.log(self.max_aspect), generator))
        return int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))

    def _place_block(self, grid: torch.Tensor, budget: int, generator) -> int:
        h, w = grid.shape
        for _ in range(10):
            bh, bw = self.block_shape(budget, generator)
            if bw < w and bh < h:
                top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
                window = grid[top : top + bh, left : left + bw]
                new = int(bh * bw - window.sum())
                if 0 < new <= budget:
                    window.fill_(True)
                    return new
        return 0

    def sample_one(self, h: int, w: int, k: int, generator) -> torch.Tensor:
        grid = torch.zeros(h, w, dtype=torch.bool)
        max_patches = self.max_num_patches or k
        count = 0
        while count < k:
            added = self._place_block(grid, min(k - count, max_patches), generator)
            if added == 0:
                break
            count += added
        return grid.flatten()

    @property
    def exact_count(self) -> bool:
        return self.exact

    def sample(self, batch_size, h, w, k, generator):
        mask = torch.stack([self.sample_one(h, w, k, generator) for _ in range(batch_size)])
        return fill_to_count(mask, k, generator) if self.exact else mask


@register_mask("grid")
class GridMask(MaskStrategy):
    """Regular pattern (MAE's grid-wise ablation): keep one patch of every ``c x c`` cell.

    ``c = round(1 / sqrt(1 - ratio))`` (2 for 75%); the kept phase is drawn per sample. Where
    ``1 - 1/c^2`` is not the ratio exactly, random patches top up or trim to the exact count.
    """

    def sample(self, batch_size, h, w, k, generator):
        c = max(1, round(1.0 / math.sqrt(1.0 - self.ratio)))
        rows = torch.arange(h).view(h, 1)
        cols = torch.arange(w).view(1, w)
        masks = []
        for _ in range(batch_size):
            dy, dx = _randint(0, c - 1, generator), _randint(0, c - 1, generator)
            keep = ((rows % c) == dy) & ((cols % c) == dx)
            masks.append(~keep.flatten())
        return fill_to_count(torch.stack(masks), k, generator)


@register_mask("center")
class CenterMask(MaskStrategy):
    """One contiguous, near-square block of exactly ``round(ratio * L)`` patches.

    Centred by default; ``random_position=True`` places it uniformly at random instead. The last
    row of the block may be partial so the count is exact and the block stays connected.
    """

    def __init__(self, ratio: float = 0.5, random_position: bool = False, cell: int = 1):
        super().__init__(ratio, cell)
        self.random_position = random_position

    def sample(self, batch_size, h, w, k, generator):
        bw = min(w, math.ceil(math.sqrt(k)))
        bh = math.ceil(k / bw)
        masks = []
        for _ in range(batch_size):
            if self.random_position:
                top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
            else:
                top, left = (h - bh) // 2, (w - bw) // 2
            grid = torch.zeros(h, w, dtype=torch.bool)
            block = torch.zeros(bh * bw, dtype=torch.bool)
            block[:k] = True
            grid[top : top + bh, left : left + bw] = block.view(bh, bw)
            masks.append(grid.flatten())
        return torch.stack(masks)


@register_mask("ibot")
class IBOTMask(MaskStrategy):
    """iBOT's per-image prediction ratio (bytedance/ibot ``loader.py``): with probability ``skip_prob``
    an image is left unmasked (plain DINO for that view), otherwise its ratio is drawn from
    ``U(ratio - ratio_var, ratio + ratio_var)`` and ``int(ratio * L)`` patches are masked, as
    ``shape`` ``block`` (BEiT's algorithm with iBOT's bounds: blocks of at least
    ``(min(h, w) // 3) ** 2`` patches unless ``min_num_patches`` is given, aspect in
    ``[min_aspect, 1/min_aspect]``) or ``rand``. Counts differ per image: for encoders that replace
    masked tokens (iBOT), not for those that drop them."""

    exact_count = False

    def __init__(
        self,
        ratio: float = 0.3,
        ratio_var: float = 0.2,
        skip_prob: float = 0.5,
        shape: str = "block",
        min_num_patches: int | None = None,
        min_aspect: float = 0.3,
        cell: int = 1,
    ):
        super().__init__(ratio, cell)
        if not 0.0 <= ratio_var <= min(ratio, 1.0 - ratio):
            raise ValueError(
                f"ibot mask needs 0 <= ratio_var <= min(ratio, 1 - ratio), got ratio {ratio}, "
                f"ratio_var {ratio_var}; iBOT uses mask.ratio=0.3 mask.ratio_var=0.2"
            )
        if not 0.0 <= skip_prob < 1.0:
            raise ValueError(f"ibot mask needs skip_prob in [0, 1), got {skip_prob}")
        if shape not in ("block", "rand"):
            raise ValueError(f"ibot mask shape must be 'block' or 'rand', got {shape!r}")
        self.ratio_var, self.skip_prob, self.shape = float(ratio_var), float(skip_prob), shape
        self.min_num_patches, self.min_aspect = min_num_patches, float(min_aspect)

    def sample(self, batch_size, h, w, k, generator):
        block = BlockMask(
            self.ratio,
            min_num_patches=self.min_num_patches or max(1, (min(h, w) // 3) ** 2),
            min_aspect=self.min_aspect,
            exact=False,
        )
        masks = torch.zeros(batch_size, h * w, dtype=torch.bool)
        for i in range(batch_size):
            if float(torch.rand((), generator=generator)) < self.skip_prob:
                continue
            count = int(_uniform(self.ratio - self.ratio_var, self.ratio + self.ratio_var, generator) * h * w)
            if self.shape == "block":
                masks[i] = block.sample_one(h, w, count, generator)
            else:
                masks[i, torch.randperm(h * w, generator=generator)[:count]] = True
        return masks
