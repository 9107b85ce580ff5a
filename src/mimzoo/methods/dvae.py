"""BEiT stage 1: train a discrete VAE tokenizer (DALL-E's recipe at small scale).

Gumbel-softmax codes with a temperature annealed exponentially per step (DALL-E: 1 -> 1/16),
reconstruction loss on [0, 1] pixels, plus ``kl_weight * KL(q(z|x) || uniform)`` with the weight
warmed up so early training is not pushed to uniform codes before the decoder learns anything.
``tokenizer()`` hands the trained encoder to stage 2 as a :class:`~mimzoo.nn.tokenizer.Tokenizer`;
:func:`load_tokenizer` reads it back from a checkpoint. A :class:`MIMMethod` without mask or encoder:
``uses_mask`` and ``has_features`` are off, so it gets no mask and no probes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mimzoo.nn.dvae import DiscreteVAE, kl_to_uniform
from mimzoo.nn.tokenizer import DVAETokenizer
from mimzoo.optim import schedule_steps

from .base import MIMMethod, MIMOutput


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


class DVAE(MIMMethod):
    """``forward(images)`` takes the dataset-normalised batch; pixels are compared in [0, 1]. The
    output's ``pred`` is the reconstruction ``[B, C, H, W]`` in [0, 1] (unclamped)."""

    uses_mask = has_features = False
    reconstructs = True

    def __init__(
        self,
        vae: dict | None = None,
        image_size: int = 32,
        tau: dict | None = None,
        kl: dict | None = None,
        recon_loss: str = "mse",
        hard: bool = False,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        optim: dict | None = None,
    ):
        super().__init__(optim=optim)
        if recon_loss not in ("mse", "smooth_l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'smooth_l1', got {recon_loss!r}")
        self.save_hyperparameters()
        self.vae = DiscreteVAE(**(vae or {}))
        self._image_size, self.recon_loss_kind, self.hard = image_size, recon_loss, hard
        self.tau_cfg = {"start": 1.0, "end": 1 / 16, "anneal": 1.0, **(tau or {})}
        self.kl_cfg = {"weight": 0.0, "warmup": 0.1, "shape": "cosine", **(kl or {})}
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.total_steps: int | None = None  # set when the trainer builds the optimiser

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size, self._image_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._image_size // self.vae.downsample, self._image_size // self.vae.downsample

    # --- schedules ----------------------------------------------------------------------------
    def tau(self) -> float:
        return (
            gumbel_temperature(self.global_step, self.total_steps, **self.tau_cfg)
            if self.total_steps
            else self.tau_cfg["start"]
        )

    def kl_weight(self) -> float:
        return (
            kl_weight_at(self.global_step, self.total_steps, **self.kl_cfg)
            if self.total_steps
            else self.kl_cfg["weight"]
        )

    # --- model --------------------------------------------------------------------------------
    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.std + self.mean).clamp(0, 1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        if mask is not None:
            raise ValueError("the dVAE sees whole images and takes no mask")
        pixels = self.to_pixels(images)
        recon, logits = self.vae(pixels, tau=self.tau(), hard=self.hard)
        loss_fn = F.mse_loss if self.recon_loss_kind == "mse" else F.smooth_l1_loss
        recon_loss = loss_fn(recon.float(), pixels)
        kl = kl_to_uniform(logits)
        kl_weight = self.kl_weight()
        ids = logits.argmax(1)
        # code usage; not torch.bincount, whose output size depends on the data (a host sync on a GPU)
        ids = ids.flatten()
        probs = (
            torch.zeros(self.vae.num_tokens, device=ids.device).index_add_(
                0, ids, torch.ones_like(ids, dtype=torch.float)
            )
            / ids.numel()
        )
        perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())
        logs = {
            "recon_loss": recon_loss.detach(),
            "kl": kl.detach(),
            "perplexity": perplexity,
            "codes_used": (probs > 0).float().mean(),
            "tau": self.tau(),
            "kl_weight": kl_weight,
        }
        return MIMOutput(loss=recon_loss + kl_weight * kl, mask=None, pred=recon, logs=logs)

    def reconstruct(self, images: torch.Tensor, out: MIMOutput) -> torch.Tensor:
        """The reconstruction in the dataset-normalised space (for ReconstructionPanels)."""
        return (out.pred.float().clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Argmax code ids ``[B, h*w]``, row-major, of dataset-normalised images."""
        return self.vae.logits(self.to_pixels(images)).argmax(1).flatten(1)

    def tokenizer(self) -> DVAETokenizer:
        """A frozen copy of the encoder + codebook as a stage-2 tokenizer."""
        return DVAETokenizer(copy.deepcopy(self.vae), self._image_size, self.hparams.mean, self.hparams.std).eval()

    # --- training -----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)  # eval mode: argmax (hard) codes
        self.log_dict({f"val/{k}": out.logs[k] for k in ("recon_loss", "perplexity", "codes_used")}, sync_dist=True)
        return out

    def configure_optimizers(self):
        self.total_steps = schedule_steps(self.trainer)  # the tau and KL schedules' length
        return super().configure_optimizers()


def load_tokenizer(path, mean=None, std=None) -> DVAETokenizer:
    """The stage-2 tokenizer of a ``mimzoo-train model=dvae`` checkpoint; ``mean``/``std`` default to its
    training data's."""
    path = Path(path)
    hint = "train one with `mimzoo-train model=dvae data=<data>` and pass its checkpoints/last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"dVAE tokenizer checkpoint {path} does not exist; {hint}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    method = (ckpt.get("mimzoo") or {}).get("method") if isinstance(ckpt, dict) else None
    expected = f"{DVAE.__module__}.{DVAE.__qualname__}"
    if method != expected:
        raise ValueError(
            f"{path} is not a mimzoo dVAE checkpoint (written by {method or 'no mimzoo method'}, "
            f"expected {expected}); {hint}"
        )
    model = DVAE(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return DVAETokenizer(model.vae, model._image_size, mean or model.hparams.mean, std or model.hparams.std).eval()
