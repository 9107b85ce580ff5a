"""Fixed 2-D sin-cos position embeddings, laid out exactly as MAE's ``util/pos_embed.py``."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(t*w_0..), cos(t*w_0..)]`` with ``w_k = 1 / 10000^(k / (dim/2))``; returns ``[N, dim]``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Table ``[1 (+1), h*w, dim]``: first half of the channels codes the column, second the row.

    Rows are flattened row-major (token ``n = row * w + col``); an all-zero slot is prepended for
    ``[CLS]`` when ``cls_token``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)
