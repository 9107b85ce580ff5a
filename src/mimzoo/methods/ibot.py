"""iBOT (Zhou et al., ICLR 2022): masked image modeling with an online tokenizer.

Follows bytedance/ibot ``main_ibot.py`` (``iBOTLoss``), ``models/head.py`` and ``loader.py``: a
student ViT sees the two global crops with masked patches replaced by a mask token (plus unmasked
local crops); an EMA teacher sees the global crops unmasked. ``[CLS]`` self-distillation across
views plus patch-token self-distillation on masked positions of the same view, with centred and
sharpened teacher targets. The EMA mechanism is shared (:class:`TeacherStudentMethod`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from mimzoo import masking
from mimzoo.nn import IBOTHead, MaskTokenViT
from mimzoo.optim import steps_per_epoch

from .base import MIMOutput, host_scalar
from .teacher_student import TeacherStudentMethod

NUM_GLOBAL = 2


def collapse_diagnosis(entropy: float, kl: float, num_prototypes: int, kl_threshold: float = 1e-3) -> str | None:
    """DINO's two collapse modes both drive KL(teacher || student) to 0: a uniform teacher (entropy near
    log K) or one dominating dimension (entropy near 0). Returns a message, or None when healthy."""
    if kl >= kl_threshold:
        return None
    mode = "uniform outputs" if entropy > 0.5 * math.log(num_prototypes) else "one dimension dominates"
    return (
        f"iBOT looks collapsed ({mode}): KL(teacher || student) {kl:.2e} < {kl_threshold:g}, teacher "
        f"entropy {entropy:.3f} of log K = {math.log(num_prototypes):.3f}. Check the centring "
        "(model.center_momentum), the teacher temperature (model.teacher_temp) and the learning rate"
    )


def official_teacher_temp(epoch: int, warm: float, final: float, warmup_epochs: int) -> float:
    """main_ibot.py's ``iBOTLoss.teacher_temp_schedule[epoch]``: ``np.concatenate((np.linspace(warm,
    final, W), np.ones(epochs - W) * final))`` (``teacher_temp2_schedule`` alike, without ``mim_start_epoch``)."""
    return float(np.linspace(warm, final, warmup_epochs)[epoch]) if epoch < warmup_epochs else float(final)


def _rows(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, ...]`` -> ``[M, ...]``: the rows of the flat positions ``index`` (``tokens[mask]``
    without the boolean indexing that syncs on a GPU)."""
    return tokens.flatten(0, 1).index_select(0, index)


def _linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [D] @ weight.T`` -> ``[1, K]`` in fp32 under any autocast (multiply-and-sum is not autocast)."""
    return (weight.float() * x.float()).sum(-1).unsqueeze(0)


class iBOT(TeacherStudentMethod):  # noqa: N801  (the paper's spelling)
    default_head: ClassVar[dict] = dict(
        out_dim=8192,
        patch_out_dim=None,
        hidden_dim=2048,
        bottleneck_dim=256,
        num_layers=3,
        shared_head=True,
        shared_head_teacher=None,
        norm_last_layer=False,
    )

    def __init__(
        self,
        encoder: dict,
        head: dict | None = None,
        views: dict | None = None,
        mask: dict | None = None,
        optim: dict | None = None,
        drop_path_rate: float = 0.1,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_patch_temp: float | None = None,
        warmup_teacher_temp_epochs: float = 30,
        teacher_temp_schedule: str = "official",
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        lambda_cls: float = 1.0,
        lambda_mim: float = 1.0,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float | None = 3.0,
        eval_backbone: str = "teacher",
    ):
        super().__init__(mask=mask, optim=optim, momentum=momentum, momentum_end=momentum_end)
        self.save_hyperparameters()
        if eval_backbone not in ("teacher", "student"):
            raise ValueError(f"model.eval_backbone must be 'teacher' or 'student', got {eval_backbone!r}")
        if teacher_temp_schedule not in ("official", "per_step"):
            raise ValueError(
                f"model.teacher_temp_schedule must be 'official' or 'per_step', got {teacher_temp_schedule!r}"
            )
        if teacher_temp_schedule == "official" and warmup_teacher_temp_epochs != int(warmup_teacher_temp_epochs):
            raise ValueError(
                "model.teacher_temp_schedule=official warms up over whole epochs; got "
                f"model.warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} (or use per_step)"
            )
        head = {**self.default_head, **(head or {})}
        # main_ibot.py: --shared_head (student) and --shared_head_teacher (default true) are separate
        teacher_shared = head.pop("shared_head_teacher")
        teacher_shared = head["shared_head"] if teacher_shared is None else teacher_shared
        self.student = MaskTokenViT(**{**encoder, "drop_path_rate": drop_path_rate})
        self.teacher = MaskTokenViT(**{**encoder, "drop_path_rate": 0.0})  # iBOT: no drop-path in the teacher
        self.student_head = IBOTHead(self.student.embed_dim, **head)
        self.teacher_head = IBOTHead(self.teacher.embed_dim, **{**head, "shared_head": teacher_shared})
        self.pair("teacher", "student")
        self.pair("teacher_head", "student_head")
        self.register_buffer("center", torch.zeros(1, head["out_dim"]))
        self.register_buffer("center_patch", torch.zeros(1, 1, head["patch_out_dim"] or head["out_dim"]))
        self._stats: dict[str, torch.Tensor] = {}

    # --- the encoder, views and evaluation ---------------------------------------------------------
    @property
    def encoder(self) -> MaskTokenViT:
        """The encoder being trained (the student); grid and image size come from it."""
        return self.student

    @property
    def train_views(self) -> dict:
        """The multi-crop the data module must produce; ``local_size`` defaults to 3/7 of the image
        size (96 for 224, as iBOT), rounded to a multiple of the patch size."""
        views = {
            "local_number": 0,
            "global_scale": (0.14, 1.0),
            "local_scale": (0.05, 0.4),
            "local_size": None,
            **(self.hparams.views or {}),
        }
        if views["local_size"] is None:
            p = self.student.patch_embed.patch_size[0]
            views["local_size"] = max(p, round(self.image_size[0] * 3 / 7 / p) * p)
        return views

    @property
    def eval_encoder(self) -> MaskTokenViT:
        """The teacher backbone (iBOT's kNN/linear/fine-tune protocol) or the student: probes, ``[CLS]``
        features and the export read it."""
        return self.teacher if self.hparams.eval_backbone == "teacher" else self.student

    # --- schedules ----------------------------------------------------------------------------------
    def teacher_temps(self, epoch: int | None = None) -> tuple[float, float]:
        """``(tau_cls, tau_patch)``, warmed up from ``warmup_teacher_temp`` / ``warmup_teacher_patch_temp``
        (null: the former) over ``warmup_teacher_temp_epochs`` = W; at ``epoch``, else at the trainer's
        current epoch / step, else (outside a trainer) the final values.

        ``official`` (main_ibot.py's ``iBOTLoss``): one value per epoch, ``np.linspace(warm, final, W)``
        for epochs 0..W-1, so the final value is reached at epoch W-1. ``per_step``: linear in the
        global step, the final value at epoch W."""
        h = self.hparams
        warm_patch = h.warmup_teacher_temp if h.warmup_teacher_patch_temp is None else h.warmup_teacher_patch_temp
        ramps = ((h.warmup_teacher_temp, h.teacher_temp), (warm_patch, h.teacher_patch_temp))
        if epoch is None and self._trainer is None:
            return h.teacher_temp, h.teacher_patch_temp
        if h.teacher_temp_schedule == "official":
            epoch = self.current_epoch if epoch is None else epoch
            return tuple(
                official_teacher_temp(epoch, warm, final, int(h.warmup_teacher_temp_epochs)) for warm, final in ramps
            )
        frac = 1.0
        if h.warmup_teacher_temp_epochs > 0:
            done = epoch if epoch is not None else self.global_step / steps_per_epoch(self.trainer)
            frac = min(done / h.warmup_teacher_temp_epochs, 1.0)
        return tuple(warm + frac * (final - warm) for warm, final in ramps)

    # --- forward and loss ---------------------------------------------------------------------------
    def sample_mask(self, images: torch.Tensor) -> torch.Tensor:
        """Drawn on the CPU and left there: :meth:`forward` takes the masked positions from it without a
        host sync (on a GPU mask, ``nonzero`` waits for the device to count them)."""
        return self.draw_mask(images.shape[0], device="cpu")

    def forward(self, crops: list[torch.Tensor], masks: list[torch.Tensor] | None = None) -> MIMOutput:
        """``crops``: ``[global_1, global_2, local_1, ...]`` (global crops at the model's image size);
        ``masks``: one bool ``[B, N]`` per global crop, drawn from the mask strategy when None.

        The loss reads the student's patch outputs at masked positions only, so the student's patch head
        (MLP, last layer, log-softmax over K prototypes) runs on the masked tokens alone, and the
        teacher's last layer and softmax too; the teacher's MLP runs on every patch token, because the
        centre is the mean over all of them (the last layer is linear, so the mean of its outputs is
        the last layer of the mean: one row instead of ``[2B * N, K]``)."""
        if isinstance(crops, torch.Tensor) or len(crops) < NUM_GLOBAL:
            raise ValueError(
                "iBOT takes a list of views [global_1, global_2, local...]; the data module makes "
                "them when the model's train_views are set (mimzoo-train does this)"
            )
        given = list(masks or [None] * NUM_GLOBAL)
        resolved = [self.resolve_mask(g, m) for g, m in zip(crops[:NUM_GLOBAL], given)]
        # Count the masked positions where a CPU copy exists (drawn masks, CPU masks): no device sync.
        host = [m if m is not None and m.device.type == "cpu" else r for m, r in zip(given, resolved)]
        host = torch.cat([masking.to_device(m, host[0].device) for m in host])
        globals_ = torch.cat(crops[:NUM_GLOBAL])
        index = masking.masked_index(host, globals_.device)  # [M] flat positions in [2B * N]
        mask = masking.to_device(host, globals_.device)
        with torch.no_grad():
            t_tokens = self.teacher.forward_masked(globals_)
            t_emb = self.teacher_head.embed(t_tokens)  # every token: the centre averages all patch outputs
            t_cls = self.teacher_head.last_layer(t_emb[:, 0])
            t_patch = self.teacher_head.last_layer2(_rows(t_emb[:, 1:], index))  # [M, K2]
            t_patch_mean = _linear_fp32(t_emb[:, 1:].float().mean((0, 1)), self.teacher_head.last_layer2.weight)
        s_tokens = self.student.forward_masked(globals_, mask)
        s_cls = self.student_head.last_layer(self.student_head.embed(s_tokens[:, 0]))
        s_patch = self.student_head.last_layer2(self.student_head.embed(_rows(s_tokens[:, 1:], index)))  # [M, K2]
        if len(crops) > NUM_GLOBAL:  # local crops: a second pass, unmasked, [CLS] only
            local = self.student.forward_masked(torch.cat(crops[NUM_GLOBAL:]))[:, 0]
            s_cls = torch.cat([s_cls, self.student_head.last_layer(self.student_head.embed(local))])
        loss_cls, loss_mim, entropy = self.loss(s_cls, s_patch, t_cls, t_patch, mask, index)
        loss = self.hparams.lambda_cls * loss_cls + self.hparams.lambda_mim * loss_mim
        with torch.no_grad():
            feats = F.normalize(t_tokens[:, 0].float(), dim=-1)
            logs = {
                "loss_cls": loss_cls.detach(),
                "loss_mim": loss_mim.detach(),
                "teacher_entropy": entropy,
                "teacher_student_kl": loss_cls.detach() - entropy,
                "teacher_cls_std": feats.std(0).mean(),
                "mask_ratio": mask.float().mean(),
            }
        if self.training:
            self.update_center(t_cls, t_patch_mean)
            self._stats = logs  # read by the collapse check at the epoch's end
        return MIMOutput(loss=loss, mask=mask, logs=logs)

    def loss(self, s_cls, s_patch, t_cls, t_patch, mask, index=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(L_cls, L_mim, teacher entropy)`` as iBOTLoss: ``L_cls`` averages the cross-entropy over
        ordered (global q, any view v != q) pairs; ``L_mim`` is the in-view patch cross-entropy over
        masked positions, per image divided by its masked count (unmasked images add 0), averaged over
        the images of a view, then over the views.

        ``s_patch``/``t_patch``: ``[2B, N, K2]`` at every position, or ``[M, K2]`` at the masked ones only,
        the rows of ``index`` (the flat masked positions of ``mask``, :func:`~mimzoo.masking.masked_index`)."""
        tau, tau_patch = self.teacher_temps()
        num_views = s_cls.shape[0] // (t_cls.shape[0] // NUM_GLOBAL)
        if index is None:
            index = masking.masked_index(mask, s_patch.device)
        if s_patch.dim() == 3:  # every position: keep the masked ones
            s_patch, t_patch = _rows(s_patch, index), _rows(t_patch, index)
        p_cls = F.softmax((t_cls.float() - self.center) / tau, dim=-1).chunk(NUM_GLOBAL)
        log_q_cls = F.log_softmax(s_cls.float() / self.hparams.student_temp, dim=-1).chunk(num_views)
        p_patch = F.softmax((t_patch.float() - self.center_patch.flatten(0, 1)) / tau_patch, dim=-1)
        log_q_patch = F.log_softmax(s_patch.float() / self.hparams.student_temp, dim=-1)
        ce = -(p_patch * log_q_patch).sum(-1)  # [M]
        # back onto the [2B, N] grid (zeros where unmasked: the same sums as masking every position)
        per_position = torch.zeros(mask.numel(), dtype=ce.dtype, device=ce.device).scatter(0, index, ce)
        per_image = per_position.view(mask.shape).sum(-1) / mask.float().sum(-1).clamp(min=1.0)
        loss_mim = per_image.view(NUM_GLOBAL, -1).mean(1).mean()
        cls_terms = [
            -(p_cls[q] * log_q).sum(-1).mean() for q in range(NUM_GLOBAL) for v, log_q in enumerate(log_q_cls) if v != q
        ]
        with torch.no_grad():
            p = torch.cat(p_cls)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return torch.stack(cls_terms).mean(), loss_mim, entropy

    @torch.no_grad()
    def update_center(self, t_cls: torch.Tensor, t_patch: torch.Tensor) -> None:
        """EMA of the teacher's batch-mean outputs, averaged over all ranks (so every rank centres alike).
        ``t_patch``: the patch outputs ``[..., K2]`` (all of them: ``[2B, N, K2]``), or their mean ``[1, K2]``."""
        m = self.hparams.center_momentum
        cls_mean = self._mean_over_ranks(t_cls.float().mean(0, keepdim=True))
        patch_mean = self._mean_over_ranks(t_patch.float().reshape(-1, t_patch.shape[-1]).mean(0, keepdim=True))
        self.center.mul_(m).add_(cls_mean, alpha=1 - m)
        self.center_patch.mul_(m).add_(patch_mean.unsqueeze(0), alpha=1 - m)

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x, reduce_op="mean")

    # --- training hooks -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        tau, tau_patch = self.teacher_temps()
        self.log("train/teacher_temp", host_scalar(tau))
        self.log("train/teacher_patch_temp", host_scalar(tau_patch))
        return loss

    def validation_step(self, batch, batch_idx):
        """Two global views (the image and its mirror image) with fixed masks: a val/loss that compares
        across runs; the centres are not updated."""
        images = batch[0]
        generator = torch.Generator().manual_seed(self.val_mask_seed + batch_idx)
        masks = [self.draw_mask(images.shape[0], generator, device="cpu") for _ in range(NUM_GLOBAL)]
        out = self([images, images.flip(-1)], masks)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True)
        return out

    def on_train_epoch_end(self):
        """Say so when the run has collapsed (logged as ``train/collapsed``)."""
        super().on_train_epoch_end()
        if not self._stats:
            return
        message = collapse_diagnosis(
            float(self._stats["teacher_entropy"]), float(self._stats["teacher_student_kl"]), self.center.shape[-1]
        )
        self.log("train/collapsed", float(message is not None))
        if message:
            rank_zero_warn(f"epoch {self.current_epoch}: {message}")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """iBOT: drop the last layer's gradients in the first ``freeze_last_layer_epochs`` epochs, then
        clip each parameter tensor's gradient to norm ``clip_grad`` separately; trainer clipping after."""
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for p in self.student_head.last_layer_parameters():
                p.grad = None
        if self.hparams.clip_grad:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.hparams.clip_grad)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
