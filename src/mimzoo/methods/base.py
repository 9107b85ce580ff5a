"""The LightningModule every method shares: masks, optimiser, per-step LR schedule, logging, guards.

A method subclasses :class:`MIMMethod` and implements ``forward(images, mask=None) -> MIMOutput``,
``encode(images, mask=None)`` and ``grid_size``; everything else (AdamW with the usual no-decay
groups, ``lr = blr * effective_batch / 256``, warm-up + cosine per step, the non-finite-loss guard,
checkpoint metadata) lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.optim import param_groups_weight_decay

from mimzoo import masking
from mimzoo.optim import StepScheduledModule, adamw_warmup_cosine, cosine_ramp

NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token")


@dataclass
class MIMOutput:
    """What every method's forward returns. ``pred`` is set by pixel-reconstruction methods."""

    loss: torch.Tensor
    mask: torch.Tensor  # bool [B, L], True = masked
    pred: torch.Tensor | None = None  # [B, L, p*p*C]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars to log


def _default_optim() -> dict:
    return dict(blr=1.5e-4, lr=None, betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=40, min_lr=0.0)


class MIMMethod(StepScheduledModule):
    """Shared base; subclasses call ``super().__init__(mask, optim)`` then ``save_hyperparameters()``."""

    def __init__(self, mask: dict | None = None, optim: dict | None = None):
        super().__init__()
        mask = dict(mask or {"name": "random", "ratio": 0.75})
        self.mask_strategy = masking.build(mask.pop("name"), **mask)
        self.optim_cfg = {**_default_optim(), **(optim or {})}
        self.val_mask_seed = 1234  # fixed masks on validation so val/loss compares across runs

    # --- the API each method implements -------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid; by default that of ``self.encoder`` (ViT and BEiT encoders alike)."""
        return tuple(self.encoder.grid)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.img_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per image for probes (kNN, linear): the final-norm ``[CLS]`` token, unmasked."""
        return self.encode(images)[:, 0]

    # --- masks --------------------------------------------------------------------------------
    def draw_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mask_strategy(batch_size, self.grid_size, generator=generator).to(self.device)

    def resolve_mask(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Check the image size, then use the given mask or draw one from the strategy."""
        if tuple(images.shape[-2:]) != tuple(self.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model was built for {tuple(self.image_size)}; "
                "set data.image_size to match model.encoder.img_size"
            )
        if mask is None:
            return self.draw_mask(images.shape[0])
        expected = (images.shape[0], self.grid_size[0] * self.grid_size[1])
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"mask must be a bool tensor of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
        return mask.to(images.device)

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images = batch[0]
        out = self(images)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss ({out.loss.item()}) at step {self.global_step}; lower optim.blr, "
                "set trainer.gradient_clip_val, or use trainer.precision=bf16-mixed instead of 16-mixed"
            )
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=False)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value)
        return out.loss

    def validation_step(self, batch, batch_idx):
        images = batch[0]
        generator = torch.Generator().manual_seed(self.val_mask_seed + batch_idx)
        out = self(images, mask=self.draw_mask(images.shape[0], generator))
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True)
        return out

    # --- optimisation -------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Full names of position embeddings and tokens (timm's convention; biases/norms are 1-D)."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY}

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = param_groups_weight_decay(self, weight_decay, no_weight_decay_list=self.no_weight_decay())
        for group in groups:  # which group a weight-decay schedule drives
            group["decayed"] = group["weight_decay"] > 0
        return groups

    def on_train_batch_start(self, batch, batch_idx):
        """With ``optim.weight_decay_end`` set (iBOT/DINO), weight decay follows a per-step cosine
        from ``optim.weight_decay`` to it on the decayed group."""
        end = self.optim_cfg.get("weight_decay_end")
        if end is None:
            return
        wd = cosine_ramp(self.global_step, int(self.trainer.estimated_stepping_batches),
                         self.optim_cfg["weight_decay"], end)
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("decayed"):
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.trainer, self.param_groups(self.optim_cfg["weight_decay"]), self.optim_cfg)

    def export_timm(self) -> tuple[dict, dict]:
        """``(kwargs, state_dict)``: ``timm.create_model(**kwargs)`` is the encoder as a plain timm
        model (token pooling, no head) and loads ``state_dict`` with ``strict=True``. Methods whose
        encoder is not a timm ViT override this; export and fine-tuning only use these two."""
        kwargs = {"model_name": "vit_base_patch16_224", "pretrained": False, "num_classes": 0, "global_pool": "token",
                  **self.encoder.timm_kwargs}  # the architecture name only picks the class: kwargs set every size
        return kwargs, {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        cls = type(self)
        checkpoint["mimzoo"] = {"method": f"{cls.__module__}.{cls.__qualname__}"}

