"""BEiT (Bao et al., 2022) stage 2: predict a frozen tokenizer's code for every masked patch.

Masked patches are replaced by a learned mask token, the encoder sees all positions, a linear
head over the final hidden states at masked positions is trained with cross-entropy against
``tokenizer.tokenize(images)``. Follows microsoft/unilm ``beit/modeling_pretrain.py``.

The tokenizer is frozen and kept as a plain (unregistered) attribute: it is not a submodule, so
it is not in ``state_dict``/checkpoints, not in ``parameters()`` (hence not in the optimiser) and
Lightning's ``.train()`` never flips it out of eval mode. It is moved to the images' device on use.
It is rebuilt from the ``tokenizer`` spec (saved in the hyper-parameters) when a checkpoint loads.

Without a tokenizer but with ``num_tokens`` the module is encoder-only (what ``load_official("beit", ...)``
builds from weights alone): features, ``mimzoo-eval`` and export work, the loss asks for a tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimzoo import masking
from mimzoo.nn.beit import BEiTEncoder, trunc_normal_1sigma_
from mimzoo.nn.tokenizer import DALLETokenizer, Tokenizer

from . import dvae
from .base import MIMMethod, MIMOutput

MISSING_TOKENIZER = (
    "BEiT needs a trained tokenizer: pass model.tokenizer.ckpt=<dvae ckpt> "
    "(train one with `mimzoo-train model=dvae`, then use its checkpoints/last.ckpt)"
)
NO_TOKENIZER = (
    "this BEiT has no tokenizer (built for its encoder: features, mimzoo-eval and export work); the loss needs "
    "one: tokenizer={'kind': 'dvae', 'ckpt': ...} or {'kind': 'dalle', 'path': ...} (mimzoo-import: "
    "tokenizer.kind=dvae tokenizer.ckpt=...)"
)


def load_tokenizer(spec: dict) -> Tokenizer:
    """``{"kind": "dvae", "ckpt": path}`` or ``{"kind": "dalle", "path": dir}`` (+ optional mean/std)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "dvae":
        if spec.get("ckpt") in (None, "", "???"):
            raise ValueError(MISSING_TOKENIZER)
        return dvae.load_tokenizer(spec.pop("ckpt"), **spec)
    if kind == "dalle":
        return DALLETokenizer(spec.pop("path"), **spec)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'dvae' (with ckpt) or 'dalle' (with path)")


class BEiT(MIMMethod):
    default_mask = {"name": "block", "ratio": 0.4, "exact": False}

    def __init__(
        self,
        encoder: dict,
        tokenizer: dict | nn.Module | None = None,
        mask: dict | None = None,
        optim: dict | None = None,
        num_tokens: int | None = None,
        layer_scale_init: float | None = 0.1,
        use_abs_pos_emb: bool = False,
        use_shared_rel_pos_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        """``num_tokens``, if given, is checked against the tokenizer's codebook (the head's size); with
        ``tokenizer=None`` it sizes the head of an encoder-only module (see the module docstring)."""
        super().__init__(mask=mask, optim=optim)
        self.save_hyperparameters(ignore=["tokenizer"] if isinstance(tokenizer, nn.Module) else None)
        self.encoder = BEiTEncoder(
            **{
                "layer_scale_init": layer_scale_init,
                "use_abs_pos_emb": use_abs_pos_emb,
                "use_shared_rel_pos_bias": use_shared_rel_pos_bias,
                "drop_path_rate": drop_path_rate,
                **encoder,
            }
        )
        if tokenizer is None and num_tokens is None:
            raise ValueError(MISSING_TOKENIZER)
        tok = None if tokenizer is None else self._checked_tokenizer(tokenizer, num_tokens)
        object.__setattr__(self, "tokenizer", tok)  # unregistered on purpose, see module docstring
        self.head = nn.Linear(self.encoder.embed_dim, num_tokens if tok is None else tok.num_tokens)
        trunc_normal_1sigma_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _checked_tokenizer(self, tokenizer: dict | nn.Module, num_tokens: int | None) -> nn.Module:
        """The tokenizer (built from its spec), frozen, after checking its grid and codebook size."""
        tok = tokenizer if isinstance(tokenizer, nn.Module) else load_tokenizer(tokenizer)
        tok_grid = tuple(tok.grid_size(self.image_size))
        if tok_grid != self.grid_size:
            raise ValueError(
                f"tokenizer grid {tok_grid} (downsample {tok.downsample}) does not match the encoder's patch grid "
                f"{self.grid_size} (patch {self.encoder.patch_embed.patch_size[0]}) for {self.image_size} images; "
                "one code per patch is needed: use a patch size of image size / tokenizer grid, or a tokenizer "
                "trained with that downsample factor"
            )
        if num_tokens is not None and num_tokens != tok.num_tokens:
            raise ValueError(
                f"model.num_tokens={num_tokens} but the tokenizer has {tok.num_tokens} codes; "
                "drop model.num_tokens or use a matching tokenizer checkpoint"
            )
        return tok.requires_grad_(False).eval()

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B, L]`` from the frozen tokenizer (eval mode, no gradients)."""
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        tok = self.tokenizer.to(images.device).eval()
        ids = tok.tokenize(images)
        expected = (images.shape[0], self.grid_size[0] * self.grid_size[1])
        if tuple(ids.shape) != expected:
            raise ValueError(f"tokenizer returned ids of shape {tuple(ids.shape)}, expected {expected}")
        return ids.long()

    def sample_mask(self, images: torch.Tensor) -> torch.Tensor:
        """Drawn on the CPU and left there: :meth:`forward` takes the masked positions from it without a
        host sync (``hidden[mask]`` on a GPU mask waits for the device to count them)."""
        return self.draw_mask(images.shape[0], device="cpu")

    def forward(self, images, mask=None):
        mask = self.resolve_mask(images, mask)
        index = masking.masked_index(mask, images.device)  # where the mask is: no sync for a drawn one
        mask = masking.to_device(mask, images.device)
        hidden = self.encoder.forward_masked(images, mask)[:, 1:]
        logits = self.head(hidden.flatten(0, 1).index_select(0, index)).float()  # masked positions only: [M, K]
        labels = self.target(images).flatten().index_select(0, index)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return MIMOutput(loss=loss, mask=mask, logs={"mim_acc": acc.detach()})

    def no_weight_decay(self) -> set[str]:
        """The shared names plus relative position bias tables (BEiT's no-decay list)."""
        return super().no_weight_decay() | {
            n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")
        }
