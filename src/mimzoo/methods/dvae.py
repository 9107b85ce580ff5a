"""BEiT stage 1: train a discrete VAE tokenizer (DALL-E's recipe at small scale).

Gumbel-softmax codes with a temperature annealed exponentially per step (DALL-E: 1 -> 1/16),
reconstruction loss on [0, 1] pixels, plus ``kl_weight * KL(q(z|x) || uniform)`` with the weight
warmed up so early training is not pushed to uniform codes before the decoder learns anything.
``tokenizer()`` hands the trained encoder to stage 2 as a :class:`~mimzoo.nn.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay

from mimzoo.nn.dvae import DiscreteVAE, kl_to_uniform
from mimzoo.nn.tokenizer import DVAETokenizer
from mimzoo.optim import StepScheduledModule, adamw_warmup_cosine

from .base import MIMMethod, _default_optim


def gumbel_temperature(step: int, total: int, start: float = 1.0, end: float = 1 / 16, anneal: float = 1.0) -> float:
    """Exponential anneal ``start * (end/start) ** (step / (anneal * total))``, held at ``end`` after."""
    t = min(step / max(anneal * total, 1), 1.0)
    return start * (end / start) ** t


def kl_weight_at(step: int, total: int, weight: float, warmup: float = 0.1, shape: str = "cosine") -> float:
    """``weight`` reached over the first ``warmup`` fraction of the run, linearly or by half a cosine."""
    t = min(step / max(warmup * total, 1), 1.0) if warmup > 0 else 1.0
    if shape == "linear":
        return weight * t
    if shape == "cosine":
        return weight * 0.5 * (1 - math.cos(math.pi * t))
    raise ValueError(f"kl.shape must be 'linear' or 'cosine', got {shape!r}")


@dataclass
class DVAEOutput:
    loss: torch.Tensor
    recon: torch.Tensor  # [B, C, H, W] pixels in [0, 1] (unclamped)
    logits: torch.Tensor  # [B, num_tokens, h, w]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class DVAE(StepScheduledModule):
    """``forward(images)`` takes the dataset-normalised batch; pixels are compared in [0, 1]."""

    def __init__(self, vae: dict | None = None, image_size: int = 32, tau: dict | None = None, kl: dict | None = None,
                 recon_loss: str = "mse", hard: bool = False, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 mask: dict | None = None, optim: dict | None = None):
        super().__init__()
        # `mask` is accepted and ignored: build_model passes the global mask config, a dVAE sees whole images
        if recon_loss not in ("mse", "smooth_l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'smooth_l1', got {recon_loss!r}")
        self.save_hyperparameters(ignore=["mask"])
        self.vae = DiscreteVAE(**(vae or {}))
        self.image_size, self.recon_loss_kind, self.hard = image_size, recon_loss, hard
        self.tau_cfg = {"start": 1.0, "end": 1 / 16, "anneal": 1.0, **(tau or {})}
        self.kl_cfg = {"weight": 0.0, "warmup": 0.1, "shape": "cosine", **(kl or {})}
        self.optim_cfg = {**_default_optim(), **(optim or {})}
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.total_steps: int | None = None  # set when the trainer builds the optimiser

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size // self.vae.downsample, self.image_size // self.vae.downsample

    # --- schedules ----------------------------------------------------------------------------
    def tau(self) -> float:
        return gumbel_temperature(self.global_step, self.total_steps, **self.tau_cfg) if self.total_steps \
            else self.tau_cfg["start"]

    def kl_weight(self) -> float:
        return kl_weight_at(self.global_step, self.total_steps, **self.kl_cfg) if self.total_steps \
            else self.kl_cfg["weight"]

    # --- model --------------------------------------------------------------------------------
    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.std + self.mean).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> DVAEOutput:
        pixels = self.to_pixels(images)
        recon, logits = self.vae(pixels, tau=self.tau(), hard=self.hard)
        loss_fn = F.mse_loss if self.recon_loss_kind == "mse" else F.smooth_l1_loss
        recon_loss = loss_fn(recon.float(), pixels)
        kl = kl_to_uniform(logits)
        kl_weight = self.kl_weight()
        ids = logits.argmax(1)
        probs = torch.bincount(ids.flatten(), minlength=self.vae.num_tokens).float() / ids.numel()
        perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())
        logs = {"recon_loss": recon_loss.detach(), "kl": kl.detach(), "perplexity": perplexity,
                "codes_used": (probs > 0).float().mean()}
        return DVAEOutput(loss=recon_loss + kl_weight * kl, recon=recon, logits=logits, logs=logs)

    def reconstruct(self, images: torch.Tensor, out: DVAEOutput) -> torch.Tensor:
        """The reconstruction in the dataset-normalised space (for ReconstructionPanels)."""
        return (out.recon.float().clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax code ids ``[B, h*w]``, row-major, of dataset-normalised images."""
        return self.vae.logits(self.to_pixels(images)).argmax(1).flatten(1)

    def tokenizer(self) -> DVAETokenizer:
        """A frozen copy of the encoder + codebook as a stage-2 tokenizer."""
        return DVAETokenizer(copy.deepcopy(self.vae), self.image_size, self.hparams.mean, self.hparams.std).eval()

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite dVAE loss ({out.loss.item()}) at step {self.global_step}; "
                                     "lower optim.blr or set trainer.gradient_clip_val")
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        self.log_dict({"train/tau": self.tau(), "train/kl_weight": self.kl_weight()})
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self(batch[0])  # eval mode: argmax (hard) codes
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"val/{k}": out.logs[k] for k in ("recon_loss", "perplexity", "codes_used")}, sync_dist=True)
        return out

    def configure_optimizers(self):
        self.total_steps = int(self.trainer.estimated_stepping_batches)  # the tau and KL schedules' length
        groups = param_groups_weight_decay(self, self.optim_cfg["weight_decay"])
        return adamw_warmup_cosine(self.trainer, groups, self.optim_cfg)

    on_save_checkpoint = MIMMethod.on_save_checkpoint  # records {"mimzoo": {"method": ...}} for load_pretrained
