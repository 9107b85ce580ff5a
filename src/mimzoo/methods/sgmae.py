"""Self-Guided MAE (Shin, Lee, Lee, Lee, NeurIPS 2024): MAE that switches from random to informed
masks built from its own patch clustering (Normalized Cut on its own features).

No official code exists. The exploitation rate, the switch rule and every mask detail are
reconstructions (see docs/sgmae.md in the mimzoo repository), each a constructor argument (config key):

* phase A (epoch < T): plain MAE; once per epoch a fixed probe batch measures, per decoder layer, how
  much attention the masked-position outputs draw from visible tokens versus mask tokens;
* T: ``start_epoch`` when given, else the first epoch at which ``R_M >= R_V`` held for ``exploit_k``
  consecutive probes (with ``exploit_cross``, after a probe below; latest at ``fallback_fraction *
  max_epochs``); kept in buffers, so it survives
  resume, and broadcast from rank 0, so every DDP rank switches together;
* phase B: per step, an unmasked eval-mode encoder pass in inference mode (under the run's autocast)
  gives the features the registry's ``self_guided`` strategy turns into a mask with the exact MAE
  count; forward and loss are MAE's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mimzoo import masking
from mimzoo.masking import InformedMask

from .mae import MAE

EXPLOIT_NORMS = ("per_token", "raw")
EXPLOIT_AGGS = ("per_layer", "mean", "rollout", "majority")


@contextmanager
def recorded_attention(blocks):
    """Collect the head-averaged ``softmax(QK^T / sqrt(d))`` of each timm block, recomputed from the
    attention's input (fused SDPA returns no weights). Meant for a probe batch under ``no_grad``."""
    maps: list[torch.Tensor] = []

    def hook(attn, args, _out):
        x = args[0]
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]).float(), attn.k_norm(qkv[1]).float()
        maps.append(((q * attn.scale) @ k.mT).softmax(-1).mean(1))

    handles = [block.attn.register_forward_hook(hook) for block in blocks]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def exploitation_rates(
    attn: torch.Tensor, mask: torch.Tensor, norm: str = "per_token", include_cls: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R_V->O, R_M->O)`` of one attention map ``[B, 1+N, 1+N]`` (token 0 = ``[CLS]``).

    O: query rows at masked positions; V: visible-token keys (plus ``[CLS]``); M: mask-token keys.
    ``raw``: the mean over O of the attention mass on V (resp. M), summing to 1 with ``[CLS]`` in V.
    ``per_token``: divided by the key share ``|G| / (|V| + |M|)``, so uniform attention gives 1 and 1.
    """
    if norm not in EXPLOIT_NORMS:
        raise ValueError(f"unknown exploit_norm {norm!r}; choose one of {EXPLOIT_NORMS}")
    attn, mask = attn.float(), mask.to(attn.device)
    cls = torch.full_like(mask[:, :1], include_cls)
    v_keys = torch.cat([cls, ~mask], 1).float()
    m_keys = torch.cat([torch.zeros_like(cls), mask], 1).float()
    queries = mask.float()
    rows = attn[:, 1:]
    mass_v = ((rows @ v_keys.unsqueeze(-1)).squeeze(-1) * queries).sum() / queries.sum()
    mass_m = ((rows @ m_keys.unsqueeze(-1)).squeeze(-1) * queries).sum() / queries.sum()
    if norm == "raw":
        return mass_v, mass_m
    n_v, n_m = v_keys.sum(1).mean(), m_keys.sum(1).mean()
    return mass_v * (n_v + n_m) / n_v, mass_m * (n_v + n_m) / n_m


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """``prod_l (A^l / 2 + I / 2)`` (Abnar & Zuidema), row-normalised: the attention of the last layer's
    outputs traced back to the decoder's input tokens."""
    eye = torch.eye(maps[0].shape[-1], device=maps[0].device)
    out = None
    for a in maps:
        a = 0.5 * a + 0.5 * eye
        out = a if out is None else a @ out
    return out / out.sum(-1, keepdim=True)


def exploit_condition(
    maps: list[torch.Tensor],
    mask: torch.Tensor,
    norm: str = "per_token",
    agg: str = "per_layer",
    layer: int = -1,
    include_cls: bool = True,
) -> dict:
    """Per-layer rates, the aggregated pair the rule reads, and whether ``R_M >= R_V`` holds."""
    if agg not in EXPLOIT_AGGS:
        raise ValueError(f"unknown exploit_agg {agg!r}; choose one of {EXPLOIT_AGGS}")
    rates = [exploitation_rates(a, mask, norm, include_cls) for a in maps]
    r_v = torch.stack([r[0] for r in rates])
    r_m = torch.stack([r[1] for r in rates])
    if agg == "per_layer":
        agg_v, agg_m = r_v[layer], r_m[layer]
    elif agg == "rollout":
        agg_v, agg_m = exploitation_rates(attention_rollout(maps), mask, norm, include_cls)
    else:
        agg_v, agg_m = r_v.mean(), r_m.mean()
    holds = bool((r_m >= r_v).float().mean() > 0.5) if agg == "majority" else bool(agg_m >= agg_v)
    return dict(visible=r_v, mask=r_m, agg_visible=agg_v, agg_mask=agg_m, holds=holds)


def switch_epoch(conditions: list[bool], k: int = 2, cross: bool = False) -> int | None:
    """The epoch at which ``R_M >= R_V`` has held for ``k`` consecutive probes (None if never); with
    ``cross``, only probes after one where it did not hold count (an overtaking, not a start above)."""
    streak, below = 0, False
    for epoch, holds in enumerate(conditions):
        below |= not holds
        streak = streak + 1 if holds and (below or not cross) else 0
        if streak >= k:
            return epoch
    return None


class SGMAE(MAE):
    """MAE + exploitation-rate probe + self-guided informed masking (see the module docstring).

    ``mask`` is phase A's (and validation's) mask; ``informed`` holds the ``self_guided`` strategy's
    parameters (its ratio defaults to ``mask.ratio``).
    """

    def __init__(
        self,
        encoder: dict,
        decoder: dict | None = None,
        mask: dict | None = None,
        optim: dict | None = None,
        norm_pix_loss: bool = True,
        informed: dict | None = None,
        emb_layer: int = -1,
        start_epoch: int | None = None,
        fallback_fraction: float | None = 0.125,
        exploit_norm: str = "per_token",
        exploit_agg: str = "per_layer",
        exploit_layer: int = -1,
        exploit_k: int = 2,
        exploit_cross: bool = True,
        exploit_include_cls: bool = True,
        hint_ratio_end: float | None = None,
        probe_size: int = 256,
        probe_seed: int = 0,
        panels: dict | None = None,
    ):
        super().__init__(encoder, decoder, mask=mask, optim=optim, norm_pix_loss=norm_pix_loss)
        self.save_hyperparameters()
        self.informed_strategy = masking.build("self_guided", **{"ratio": self.mask_strategy.ratio, **(informed or {})})
        depth = len(self.encoder.blocks)
        if not -depth <= emb_layer < depth:
            raise ValueError(
                f"model.emb_layer={emb_layer} but the encoder has {depth} blocks (0..{depth - 1}, or -1 for the last)"
            )
        self.emb_layer = emb_layer % depth
        if exploit_agg not in EXPLOIT_AGGS or exploit_norm not in EXPLOIT_NORMS:
            raise ValueError(f"exploit_agg must be one of {EXPLOIT_AGGS} and exploit_norm one of {EXPLOIT_NORMS}")
        self.start_epoch, self.fallback_fraction, self.hint_ratio_end = start_epoch, fallback_fraction, hint_ratio_end
        self.exploit = dict(norm=exploit_norm, agg=exploit_agg, layer=exploit_layer, include_cls=exploit_include_cls)
        self.exploit_k, self.exploit_cross = int(exploit_k), bool(exploit_cross)
        self.probe_size, self.probe_seed = int(probe_size), int(probe_seed)
        self.panels = {"enabled": True, "num_images": 8, "every_n_epochs": 1, **(panels or {})}
        # The switch state lives in buffers: saved in every checkpoint, restored on resume.
        self.register_buffer("sg_informed", torch.tensor(False))
        self.register_buffer("sg_switch_epoch", torch.tensor(-1))
        self.register_buffer("sg_streak", torch.tensor(0))
        self.register_buffer("sg_probe_epoch", torch.tensor(-1))
        self.register_buffer("sg_seen_below", torch.tensor(False))  # a probe with R_M < R_V happened
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._host_copies: dict[str, tuple[torch.Tensor, int, object]] = {}
        self._epoch_logs: tuple[int, dict] | None = None  # (epoch, the probe values logged at its start)
        self._relog = False

    def _host_value(self, name: str):
        """A switch buffer's value read on the host once per change, not once per step (on a GPU each
        read is a sync): in-place writes (``fill_``, ``load_state_dict``'s ``copy_``) bump the tensor's
        version, and moving the module makes a new tensor."""
        buf = getattr(self, name)
        seen = self._host_copies.get(name)
        if seen is None or seen[0] is not buf or seen[1] != buf._version:
            seen = (buf, buf._version, buf.item())
            self._host_copies[name] = seen
        return seen[2]

    def _apply(self, fn, recurse=True):
        """Moving the module (``.to``, ``.cuda``) makes new buffers: carry the host copies still valid over."""
        seen = self.__dict__.get("_host_copies", {})
        valid = {name: s[2] for name, s in seen.items() if s[0] is getattr(self, name) and s[1] == s[0]._version}
        out = super()._apply(fn, recurse)
        self._host_copies = {
            name: (getattr(self, name), getattr(self, name)._version, value) for name, value in valid.items()
        }
        return out

    @property
    def informed(self) -> bool:
        return bool(self._host_value("sg_informed"))

    # --- informed masks -------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` patch tokens of block ``emb_layer`` (final norm on the last) of the *unmasked*
        image: eval mode (no drop-path), inference mode (no autograd bookkeeping; under the caller's
        autocast, e.g. the run's bf16), the encoder's train mode restored after."""
        depth, layer = len(self.encoder.blocks), self.emb_layer
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.inference_mode():
                return self.encoder.forward_intermediates(
                    images,
                    indices=[layer],
                    norm=layer == depth - 1,
                    stop_early=True,
                    output_fmt="NLC",
                    intermediates_only=True,
                )[0]
        finally:
            self.encoder.train(was_training)

    def hint_ratio(self, epoch: int, max_epochs: int | None) -> float:
        """The configured hint ratio, or with ``hint_ratio_end`` a linear ramp to it over phase B."""
        start = self.informed_strategy.hint_ratio
        if self.hint_ratio_end is None or not max_epochs:
            return start
        switched = int(self._host_value("sg_switch_epoch"))
        if switched < 0:
            return start
        progress = min(max((epoch - switched) / max(max_epochs - 1 - switched, 1), 0.0), 1.0)
        return start + (self.hint_ratio_end - start) * progress

    def informed_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> InformedMask:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        hint = self.hint_ratio(self.current_epoch, max_epochs if max_epochs and max_epochs > 0 else None)
        return self.informed_strategy.build(
            self.grid_size, generator, features=self.patch_features(images), hint_ratio=hint
        )

    def sample_mask(self, images: torch.Tensor) -> torch.Tensor:
        """In training after the switch, an informed mask; otherwise a draw from the random strategy."""
        if not (self.training and self.informed):
            return super().sample_mask(images)
        informed = self.informed_mask(images, self.mask_generator)
        if self._trainer is not None:
            self.log("sgmae/fallback_rate", informed.fallback.float().mean())  # a device tensor: no sync
        return informed.mask

    def drawn_count(self) -> int | None:
        """The informed strategy's count while :meth:`sample_mask` draws informed masks, else MAE's."""
        if self.training and self.informed:
            return self.informed_strategy.count(self.grid_size)
        return super().drawn_count()

    # --- exploitation-rate probe and the switch ---------------------------------------------------
    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``probe_size`` validation images (unsharded, so the same on every rank) and a fixed random mask."""
        if self._probe is None:
            dm = getattr(self.trainer, "datamodule", None)
            loader = dm.val_dataloader() if dm is not None else self.trainer.train_dataloader
            images, count = [], 0
            for batch in loader:
                images.append(batch[0])
                count += batch[0].shape[0]
                if count >= self.probe_size:
                    break
            images = torch.cat(images)[: self.probe_size]
            self._probe = (images, self.draw_mask(images.shape[0], torch.Generator().manual_seed(self.probe_seed)))
        images, mask = self._probe
        return images.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def probe_exploitation(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        was_training = self.training
        self.eval()
        try:
            with recorded_attention(self.decoder.blocks) as maps:
                self(images, mask)
        finally:
            self.train(was_training)
        return exploit_condition(maps, mask, **self.exploit)

    def update_switch(self, epoch: int, holds: bool, max_epochs: int | None = None) -> bool:
        """Advance the switch state by one probe at the start of ``epoch``; True once informed. A probe of an
        epoch already counted (a resume from a mid-epoch checkpoint) does not count twice."""
        if epoch > int(self.sg_probe_epoch):
            self.sg_seen_below.fill_(bool(self.sg_seen_below) or not holds)
            counts = holds and (bool(self.sg_seen_below) or not self.exploit_cross)
            self.sg_streak.fill_(int(self.sg_streak) + 1 if counts else 0)
            self.sg_probe_epoch.fill_(epoch)
        if self.informed:
            return True
        if self.start_epoch is not None:
            fire = epoch >= self.start_epoch
        else:
            forced = self.fallback_fraction and max_epochs
            latest = max(1, round(self.fallback_fraction * max_epochs)) if forced else None
            fire = int(self.sg_streak) >= self.exploit_k or (latest is not None and epoch >= latest)
        if self._trainer is not None:
            fire = self.trainer.strategy.broadcast(fire, src=0)  # one decision for every rank
        if fire:
            self.sg_informed.fill_(True)
            self.sg_switch_epoch.fill_(epoch)
        return self.informed

    def on_train_epoch_start(self):
        rates = self.probe_exploitation(*self.probe_batch())
        logs = {}
        for i, (v, m) in enumerate(zip(rates["visible"], rates["mask"])):
            logs[f"sgmae/exploit_visible_l{i}"], logs[f"sgmae/exploit_mask_l{i}"] = v, m
        logs["sgmae/exploit_visible"], logs["sgmae/exploit_mask"] = rates["agg_visible"], rates["agg_mask"]
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        self.update_switch(self.current_epoch, rates["holds"], max_epochs)
        logs["sgmae/informed"] = float(self.informed)
        if self.informed:
            logs["sgmae/switch_epoch"] = float(self.sg_switch_epoch)
        self._epoch_logs = (self.current_epoch, {k: float(v) for k, v in logs.items()})
        for name, value in logs.items():
            self.log(name, value, on_epoch=True, batch_size=1)

    # A resume mid-epoch skips on_train_epoch_start: the epoch's probe values come from the checkpoint instead.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sgmae_epoch_logs"] = self._epoch_logs

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._epoch_logs = checkpoint.get("sgmae_epoch_logs")
        self._relog = True

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        if self._relog and self._epoch_logs and self._epoch_logs[0] == self.current_epoch and batch_idx > 0:
            for name, value in self._epoch_logs[1].items():
                self.log(name, torch.tensor(value, dtype=torch.float32), on_step=False, on_epoch=True, batch_size=1)
        self._relog = False

    def configure_callbacks(self):
        """The bipartition / informed-mask pictures, into ``<run dir>/informed_masks``."""
        from mimzoo.callbacks.informed_masks import InformedMaskPanels

        if not self.panels["enabled"]:
            return []
        return [InformedMaskPanels(num_images=self.panels["num_images"], every_n_epochs=self.panels["every_n_epochs"])]
