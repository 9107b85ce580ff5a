"""iBOT's projection head (bytedance/ibot ``models/head.py``, ``iBOTHead`` over DINO's head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _last_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """Weight-normalised ``Linear(bottleneck, K, bias=False)`` with magnitude g = 1; g is frozen when
    ``norm_last_layer`` (so the layer is a cosine classifier), trainable otherwise (iBOT ViT-S)."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(not norm_last_layer)
    return layer


class IBOTHead(nn.Module):
    """Per token: MLP ``D -> hidden -> hidden -> bottleneck`` (GELU, no BatchNorm), L2-normalise, then
    the weight-normalised last layer. ``[CLS]`` and patch tokens share the MLP; with ``shared_head``
    they also share the last layer, otherwise patches get their own ``last_layer2`` (``patch_out_dim``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        patch_out_dim: int | None = None,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        shared_head: bool = True,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the iBOT head needs num_layers >= 1, got {num_layers}")
        patch_out_dim = patch_out_dim or out_dim
        if shared_head and patch_out_dim != out_dim:
            raise ValueError(f"shared_head=true needs patch_out_dim == out_dim, got {patch_out_dim} and {out_dim}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < num_layers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = _last_layer(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = (
            self.last_layer if shared_head else _last_layer(bottleneck_dim, patch_out_dim, norm_last_layer)
        )

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [B, 1 + N, D]`` -> ``(cls logits [B, K], patch logits [B, N, K2])``."""
        x = self.embed(tokens)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck of any tokens ``[..., D]`` -> ``[..., bottleneck]``: the head
        before its last layers, so a caller can run those on the tokens it needs (iBOT: masked patches)."""
        return F.normalize(self.mlp(tokens), dim=-1, p=2)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The parameters iBOT freezes during the first epoch(s)."""
        params = list(self.last_layer.parameters())
        if self.last_layer2 is not self.last_layer:
            params += list(self.last_layer2.parameters())
        return params
