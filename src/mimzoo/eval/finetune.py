"""End-to-end fine-tuning (MAE ``main_finetune.py``): the exported encoder as a plain timm ViT with
global average pooling (``fc_norm``, no final norm), drop-path, AdamW with layer-wise LR decay,
mixup/cutmix with label smoothing."""

from __future__ import annotations

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from mimzoo.optim import adamw_warmup_cosine

from .linear import Classifier

# What a pre-trained encoder (token pooling, final norm) lacks or has beyond a global-pool classifier.
NEW_PREFIXES = ("fc_norm.", "head.")
DROPPED_PREFIXES = ("norm.",)


class FineTune(Classifier):
    """``timm_kwargs`` are the encoder's ``timm.create_model`` arguments (``export_timm()``), so any
    method's encoder (ViT, BEiT) fine-tunes the same way; build with :meth:`from_pretrained`."""

    def __init__(
        self,
        timm_kwargs: dict,
        num_classes: int,
        drop_path_rate: float = 0.1,
        blr: float = 5e-4,
        lr: float | None = None,
        betas: tuple = (0.9, 0.999),
        weight_decay: float = 0.05,
        layer_decay: float = 0.65,
        warmup_epochs: float = 5,
        min_lr: float = 1e-6,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
    ):
        super().__init__(num_classes)
        self.save_hyperparameters()
        self.model = timm.create_model(
            **{**timm_kwargs, "num_classes": num_classes, "global_pool": "avg", "drop_path_rate": drop_path_rate}
        )
        nn.init.trunc_normal_(self.model.head.weight, std=2e-5)
        nn.init.zeros_(self.model.head.bias)
        if mixup > 0 or cutmix > 0:  # label smoothing is folded into the mixed targets
            self.mixup = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
            )
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.mixup = None
            self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    @classmethod
    def from_pretrained(cls, pretrained, num_classes: int, **recipe) -> FineTune:
        kwargs, state_dict = pretrained.export_timm()
        module = cls(kwargs, num_classes, **recipe)
        module.load_encoder(state_dict)
        return module

    def load_encoder(self, state_dict: dict) -> None:
        """Load encoder weights; only the pooling change (final norm out, fc_norm and head in) may differ."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        bad = [k for k in missing if not k.startswith(NEW_PREFIXES)] + [
            k for k in unexpected if not k.startswith(DROPPED_PREFIXES)
        ]
        if bad:
            raise ValueError(
                f"encoder weights do not fit the fine-tuning ViT: missing {missing}, unexpected {unexpected}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, y = batch[0], batch[1]
        if self.mixup is not None:
            images, y = self.mixup(images, y)
        loss = self.criterion(self(images), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def param_groups(self) -> list[dict]:
        """timm's BEiT/MAE layer decay: scale ``decay^(depth + 1 - layer_id)`` as ``lr_scale`` (stem 0,
        block k -> k + 1, head depth + 1), no weight decay on 1-D params, pos_embed and cls_token."""
        h = self.hparams
        return param_groups_layer_decay(
            self.model, h.weight_decay, no_weight_decay_list=self.model.no_weight_decay(), layer_decay=h.layer_decay
        )

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.trainer, self.param_groups(), dict(self.hparams))
