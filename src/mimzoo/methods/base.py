"""The method contract, and the LightningModule every method shares.

A method is one file in ``mimzoo/methods/`` holding one :class:`MIMMethod` subclass, plus its model
config ``conf/model/<name>.yaml`` (whose defaults list also names the mask and optimiser presets the
method trains with), plus its tests. Nothing else needs to know about it: ``mimzoo-train model=<name>``,
the online probes, ``mimzoo-eval``, ``mimzoo-export``, ``load_pretrained`` and the picture callbacks
work through the members below and nothing else.

Must define
    ``__init__(..., mask=None, optim=None)``: call ``super().__init__(mask, optim)``, then
    ``self.save_hyperparameters()`` (a checkpoint rebuilds the module from them), then build
    ``self.encoder``, a :class:`~mimzoo.nn.MaskedEncoder` (it drops masked tokens or replaces them with
    a mask token; the method never needs to know which).
    ``forward(images, mask=None) -> MIMOutput``: the loss of a batch. Without a mask it uses
    :meth:`resolve_mask` (a training mask from :meth:`sample_mask`); with one it uses it as given, so
    tests, pictures and comparisons with the official code can fix it.

May override (default in brackets)
    ``default_mask``, ``default_optim`` (class attributes) [MAE's random 75% and AdamW recipe]: the
    recipe when the module is built from Python without ``mask``/``optim``.
    ``uses_mask`` [True]: False for a mask-free stage (BEiT's dVAE): no strategy, no masked row in the
    reconstruction panels, ``forward`` takes no mask.
    ``has_features`` [True]: False for a stage with no representation to evaluate (the dVAE): no online
    probes, and ``mimzoo-eval``/``mimzoo-export`` refuse its checkpoints.
    ``reconstructs`` [False]: True when :meth:`reconstruct` returns images (reconstruction panels).
    ``train_views`` [None]: the multi-crop the data module must produce instead of one view (iBOT).
    ``eval_encoder`` [``self.encoder``]: the encoder probes, ``mimzoo-eval`` and ``mimzoo-export`` use
    (iBOT: the teacher).
    :meth:`sample_mask` [a draw from the mask strategy with ``mask_generator``]: the mask of a batch given
    none (SG-MAE: informed masks after its switch).
    :meth:`features`, :meth:`encode`, :meth:`export_timm` [through ``eval_encoder``/``encoder``].
    ``configure_callbacks`` (Lightning's) for method-specific pictures (SG-MAE's informed masks).

Done here once for every method: the mask strategy from the registry, AdamW with the usual no-decay
groups, ``lr = blr * effective_batch / 256``, warm-up + cosine per step (and an optional weight-decay
cosine), logging of the loss and of ``MIMOutput.logs``, fixed validation masks, the non-finite-loss
guard, checkpoint metadata, and randomness a resume reproduces exactly (:mod:`mimzoo.seeding`): before every
training batch the global torch RNG (dropout, drop-path, Gumbel noise) is re-seeded and ``mask_generator``, the
generator training masks are drawn from, is made anew, both from (seed, epoch, batch index, rank). A method
that draws anything random in training draws it from one of the two.

No host syncs in a training step: masks are drawn on the CPU and copied without blocking, nothing
is read back from the device (``bool``/``int``/``float``/``.item()`` of a device tensor, ``nonzero``,
boolean indexing), and numbers are logged as CPU tensors (``torch.tensor(x, device=cuda)`` blocks).
The non-finite-loss guard records the first bad step on the device and raises every
``trainer.log_every_n_steps`` steps, at the epoch's end and before a checkpoint is written.
``tests/test_host_syncs.py`` runs every method's step on the meta device to keep it that way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from timm.optim import param_groups_weight_decay

from mimzoo import masking
from mimzoo.nn import MaskedEncoder
from mimzoo.optim import StepScheduledModule, adamw_warmup_cosine, cosine_ramp, schedule_steps
from mimzoo.seeding import TRAIN_GLOBAL, TRAIN_MASKS, derive_seed, run_seed, seed_torch

NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token")


def host_scalar(value):
    """A Python number as a CPU tensor, for ``self.log``: Lightning turns a number into
    ``torch.tensor(value, device=self.device)``, a blocking host-to-device copy on a GPU. Tensors pass."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))


@dataclass
class MIMOutput:
    """What every method's forward returns."""

    loss: torch.Tensor
    mask: torch.Tensor | None  # bool [B, L], True = masked (None for a mask-free stage)
    pred: torch.Tensor | None = None  # what :meth:`MIMMethod.reconstruct` turns into images
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars, logged as train/<name>


class MIMMethod(StepScheduledModule):
    """The shared base; the module docstring is the contract a subclass fulfils."""

    default_mask: ClassVar[dict] = {"name": "random", "ratio": 0.75}
    default_optim: ClassVar[dict] = dict(
        blr=1.5e-4, lr=None, betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=40, min_lr=0.0
    )
    uses_mask: ClassVar[bool] = True
    has_features: ClassVar[bool] = True
    flops_per_batch: ClassVar[None] = None  # FLOPs are not counted: Lightning's ThroughputMonitor logs img/s only
    reconstructs: ClassVar[bool] = False
    train_views: dict | None = None
    encoder: MaskedEncoder

    def __init__(self, mask: dict | None = None, optim: dict | None = None):
        super().__init__()
        if self.uses_mask:
            mask = dict(mask or self.default_mask)
            self.mask_strategy = masking.build(mask.pop("name"), **mask)
        elif mask:
            raise ValueError(f"{type(self).__name__} sees whole images and takes no mask; drop the mask config")
        self.optim_cfg = {**self.default_optim, **(optim or {})}
        self.val_mask_seed = 1234  # fixed masks on validation so val/loss compares across runs
        self._nonfinite: tuple[torch.Tensor, torch.Tensor] | None = None  # (first bad step, its loss), on the device
        self.mask_generator: torch.Generator | None = None  # per training batch, see on_train_batch_start
        self._seed = run_seed()

    # --- what the framework reads -------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.grid)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.encoder.image_size)

    @property
    def eval_encoder(self) -> MaskedEncoder:
        return self.encoder

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's final-norm tokens; with a mask, masked patches are dropped or mask tokens."""
        return self.encoder.forward_masked(images, None if mask is None else self.resolve_mask(images, mask))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """One vector per unmasked image for probes (kNN, linear), as the exported timm model computes it."""
        return self.eval_encoder.features(images)

    def reconstruct(self, images: torch.Tensor, out: MIMOutput) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (dataset-normalised) from a forward's output; see ``reconstructs``."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct pixels")

    def export_timm(self) -> tuple[dict, dict]:
        """``(kwargs, state_dict)`` of ``eval_encoder`` as a plain timm model (export and fine-tuning)."""
        return self.eval_encoder.export_timm()

    # --- masks --------------------------------------------------------------------------------
    @torch.compiler.disable  # drawn eagerly, as without compile (the same seed gives the same mask)
    def draw_mask(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A draw from the strategy, on the CPU (its generators), then on ``device`` (the module's by
        default) without a host sync (:func:`~mimzoo.masking.to_device`). Not drawn on the GPU: a CUDA
        generator gives other values for the same seed, and the block strategies place blocks in Python
        loops that need host values anyway; drawing on the CPU overlaps the GPU's queue."""
        mask = self.mask_strategy(batch_size, self.grid_size, generator=generator)
        return masking.to_device(mask, self.device if device is None else device)

    def sample_mask(self, images: torch.Tensor) -> torch.Tensor:
        """The mask of a batch given none: a draw from the strategy with ``mask_generator`` (in a training batch;
        the global RNG elsewhere)."""
        return self.draw_mask(images.shape[0], self.mask_generator)

    def resolve_mask(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Check the image size, then use the given mask (checked by the encoder) or :meth:`sample_mask`."""
        if tuple(images.shape[-2:]) != tuple(self.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} but the model was built for {tuple(self.image_size)}; "
                "set data.image_size to match model.encoder.img_size"
            )
        return self.sample_mask(images) if mask is None else self.encoder.check_mask(images, mask)

    def require_exact_masks(self) -> None:
        """A dropping encoder needs the same masked count in every image: refuse a strategy that varies it."""
        if self.encoder.drops_masked and not self.mask_strategy.exact_count:
            raise ValueError(
                f"{type(self).__name__} drops masked tokens and needs the same masked count in every image, but "
                f"{self.mask_strategy!r} varies it; use a strategy with exact counts (mask=random, mask=block "
                "with mask.exact=true, mask=grid, ...)"
            )

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        self.track_nonfinite(out.loss)
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=False)
        for name, value in out.logs.items():
            self.log(f"train/{name}", host_scalar(value))
        return out.loss

    # --- the non-finite-loss guard (no host sync per step) ----------------------------------------
    def track_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss is not finite and that loss: reading it
        here would stall a GPU every step. :meth:`raise_if_nonfinite` reads it back."""
        loss = loss.detach().float()
        if self._nonfinite is None or self._nonfinite[0].device != loss.device:
            self._nonfinite = (
                torch.full((), -1, dtype=torch.long, device=loss.device),
                torch.full((), float("nan"), device=loss.device),
            )
        first, value = self._nonfinite
        new = (first < 0) & ~torch.isfinite(loss)
        self._nonfinite = (torch.where(new, self.global_step, first), torch.where(new, loss, value))

    def raise_if_nonfinite(self) -> None:
        """Raise if a tracked step had a non-finite loss (one host read)."""
        if self._nonfinite is None:
            return
        step = int(self._nonfinite[0])
        if step >= 0:
            raise FloatingPointError(
                f"non-finite loss ({float(self._nonfinite[1])}) at step {step}; lower optim.blr, "
                "set trainer.gradient_clip_val, or use trainer.precision=bf16-mixed instead of 16-mixed"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Drops the batch's mask generator, and runs the guard's check every ``trainer.log_every_n_steps``
        batches (when the logger reads the device anyway)."""
        self.mask_generator = None
        every = getattr(self._trainer, "log_every_n_steps", 0) if self._trainer is not None else 0
        if every and (batch_idx + 1) % every == 0:
            self.raise_if_nonfinite()

    def on_train_epoch_end(self):
        self.raise_if_nonfinite()

    def validation_mask(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        """A fixed mask per validation batch, so ``val/loss`` compares across runs (None without masks)."""
        if not self.uses_mask:
            return None
        return self.draw_mask(images.shape[0], torch.Generator().manual_seed(self.val_mask_seed + batch_idx))

    def validation_step(self, batch, batch_idx):
        images = batch[0]
        out = self(images, mask=self.validation_mask(images, batch_idx))
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

    def on_train_start(self):
        super().on_train_start()
        self._seed = run_seed()

    def on_train_batch_start(self, batch, batch_idx):
        """Seeds this batch's randomness from its position (a resumed run redraws it exactly); with
        ``optim.weight_decay_end`` set (iBOT/DINO), weight decay follows a per-step cosine from
        ``optim.weight_decay`` to it on the decayed group."""
        position = (self.current_epoch, batch_idx, self.global_rank)
        seed_torch(derive_seed(self._seed, TRAIN_GLOBAL, *position), self.device)
        self.mask_generator = torch.Generator().manual_seed(derive_seed(self._seed, TRAIN_MASKS, *position))
        end = self.optim_cfg.get("weight_decay_end")
        if end is None:
            return
        wd = cosine_ramp(self.global_step, schedule_steps(self.trainer), self.optim_cfg["weight_decay"], end)
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("decayed"):
                group["weight_decay"] = wd
        self.log("train/weight_decay", host_scalar(wd))

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.trainer, self.param_groups(self.optim_cfg["weight_decay"]), self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()  # never write the weights a non-finite step has spoilt
        cls = type(self)
        checkpoint["mimzoo"] = {"method": f"{cls.__module__}.{cls.__qualname__}"}
