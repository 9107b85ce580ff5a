"""No host syncs in any method's training step, checked on the CPU.

A GPU runs ahead of the Python thread until something needs a device value on the host: then the thread
waits for the queue to drain (a sync). The step (forward, loss, logging, backward) runs here on the
*meta* device, where tensors have no data: every read of a device tensor fails (``bool``, ``int``,
``float``, ``.item()``, ``.tolist()``, ``.cpu()``, and C++ ops whose output size depends on the data, like
``nonzero``, boolean indexing or ``bincount``). On top, a blocking CPU -> device copy (``.to(device)``
without ``non_blocking``, ``torch.tensor(x, device=...)``) and a Python number given to ``self.log``
(Lightning makes it ``torch.tensor(x, device=self.device)``) count as syncs. CPU work (masks drawn with
CPU generators) is free: it is host work anyway.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import TINY_MAE
from mimzoo.methods import DVAE, MAE, SGMAE, BEiT, ConvMAE, SimMIM, iBOT

ENC = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


class HostSync(AssertionError):
    pass


def _on_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


@contextlib.contextmanager
def no_host_syncs():
    """Make host reads of meta tensors, blocking copies to meta and device tensors from Python data raise."""
    originals = {}

    def reads(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if self.device.type == "meta":
                raise HostSync(f"Tensor.{name} of a device tensor: a host sync")
            return original(self, *args, **kwargs)

        return guarded

    def to(self, *args, **kwargs):
        out = originals["to"](self, *args, **kwargs)
        non_blocking = kwargs.get("non_blocking", any(isinstance(a, bool) and a for a in args))
        if self.device.type == "cpu" and out.device.type == "meta" and not non_blocking:
            raise HostSync("a blocking copy to the device (.to without non_blocking=True): a host sync")
        return out

    def from_data(name):
        original = getattr(torch, name)

        def guarded(data, *args, device=None, **kwargs):
            if _on_meta(device) and not isinstance(data, torch.Tensor):
                raise HostSync(f"torch.{name}(<Python data>, device=...): a blocking copy")
            return original(data, *args, device=device, **kwargs)

        return guarded

    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy")
    try:
        for name in names:
            originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, reads(name))
        originals["to"] = torch.Tensor.to
        torch.Tensor.to = to
        for name in ("tensor", "as_tensor"):
            originals["torch." + name] = getattr(torch, name)
            setattr(torch, name, from_data(name))
        yield
    finally:
        for name, original in originals.items():
            if name.startswith("torch."):
                setattr(torch, name[len("torch.") :], original)
            else:
                setattr(torch.Tensor, name, original)


def step_on_meta(model, batch):
    """One training step, backward included (and for teacher-student methods the per-parameter gradient
    clipping and the EMA update that follow), on the meta device; ``self.log`` must get tensors."""
    logged = {}

    def log(name, value, *args, **kwargs):
        if not isinstance(value, torch.Tensor):
            raise HostSync(f"self.log({name!r}, {value!r}): a number becomes torch.tensor(x, device=...), a sync")
        logged[name] = value

    model = model.to("meta").train()
    if isinstance(getattr(model, "tokenizer", None), torch.nn.Module):  # unregistered (BEiT): moved on first use
        model.tokenizer.to("meta")
    model.log = log
    with no_host_syncs():
        loss = model.training_step(batch, 0)
        loss.backward()
        if hasattr(model, "update_teacher"):
            model.configure_gradient_clipping(None)
            model.update_teacher(0.996)
    assert loss.device.type == "meta" and "train/loss" in logged
    return logged


def images(b=4, size=32):
    return torch.empty(b, 3, size, size, device="meta")


def tiny_dvae():
    return DVAE(vae=dict(num_tokens=64, downsample=4, hidden_dim=32, code_dim=32, num_resblocks=0))


def sgmae(informed: bool):
    torch.manual_seed(0)
    model = SGMAE(**TINY_MAE, informed=dict(ratio=0.5))  # phase B masks another count than phase A's
    if informed:
        model.sg_informed.fill_(True)
    assert model.informed == informed  # read on the host once, before the move (not once per step)
    return model


MODELS = {
    "mae": lambda: MAE(**TINY_MAE),
    "convmae": lambda: ConvMAE(
        encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 16, 32], depth=[1, 1, 2], num_heads=2),
        decoder=TINY_MAE["decoder"],
    ),
    "sgmae-random": lambda: sgmae(informed=False),
    "sgmae-informed": lambda: sgmae(informed=True),
    "simmim": lambda: SimMIM(encoder=ENC),
    "beit": lambda: BEiT(
        encoder=ENC, tokenizer=tiny_dvae().tokenizer(), mask={"name": "block", "ratio": 0.4, "exact": False}
    ),
    "dvae": tiny_dvae,
    "ibot": lambda: iBOT(
        encoder=ENC,
        head=dict(out_dim=64, hidden_dim=32, bottleneck_dim=16),
        mask=dict(name="ibot", ratio=0.3, ratio_var=0.2),
        views=dict(local_number=2),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_reads_nothing_back_from_the_device(name):
    """Every method's step, on the meta device: no host reads, no blocking copies, no numbers logged
    (iBOT with two local crops; SG-MAE before and after its switch to informed masks)."""
    model = MODELS[name]()
    batch = (
        [images(), images(), images(size=12), images(size=12)] if name == "ibot" else images(),
        torch.zeros(4, dtype=torch.long, device="meta"),
    )
    step_on_meta(model, batch)


def test_the_checker_catches_each_kind_of_sync():
    """The checker itself: each kind of sync it claims to catch raises."""
    x = torch.ones(3, device="meta")
    cases = [
        lambda: bool(x.sum()),
        lambda: int(x.sum()),
        lambda: float(x.sum()),
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: x.cpu(),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: torch.ones(3).to("meta"),
        lambda: torch.tensor(1.0, device="meta"),
        lambda: torch.as_tensor(3, device="meta"),
    ]
    with no_host_syncs():
        for case in cases:
            with pytest.raises((HostSync, NotImplementedError, RuntimeError)):
                case()
        torch.ones(3).to("meta", non_blocking=True)  # a non-blocking copy is fine
        torch.full((), 1.0, device="meta")  # so is a fill on the device


def test_progress_bar_and_throughput_read_the_device_only_where_the_loggers_write(tmp_path, monkeypatch):
    """Lightning's bar reads the loss (``.item()``) at every refresh and its ThroughputMonitor synchronises the GPU
    every step; mimzoo's read the metrics and synchronise on the logging steps only (3 and 6 of 6 here; the bar
    also once at its first refresh), and still log samples per second over each log interval."""
    import csv

    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from mimzoo.callbacks import LoggedStepsProgressBar, LoggedThroughput, sync_free

    bar, seen = LoggedStepsProgressBar(), {"reads": [], "syncs": []}
    trainer = L.Trainer(
        max_steps=6,
        log_every_n_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[bar, LoggedThroughput(batch_size_fn=lambda b: b[0].shape[0], window_size=2)],
    )
    original = TQDMProgressBar.get_metrics

    def reads(self, trainer_, module):
        if self._in_batch_end:
            seen["reads"].append(trainer_.global_step)
        return original(self, trainer_, module)

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", reads)
    monkeypatch.setattr(sync_free, "synchronize", lambda device: seen["syncs"].append(trainer.global_step))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 32, 32), torch.zeros(24, dtype=torch.long))
    model = MAE(**TINY_MAE)
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters())  # no data module to scale the LR by
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert seen["syncs"] == [3, 6] and seen["reads"] == [1, 3, 6]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/samples_per_sec")]
    assert [(r["step"], r["train/samples"]) for r in rows] == [("2", "12"), ("5", "24")]
    assert all(float(r["train/device/samples_per_sec"]) > 0 for r in rows)
