"""What a pre-training run cost, written to ``<run dir>/cost.json`` at the end of fit (rank zero, atomically).

A comparison of methods is only fair with its price beside it: wall-clock, throughput, FLOPs, memory, size and how
many images were seen. Keys of ``cost.json``:

- ``wall_clock_s``: seconds inside ``trainer.fit``, summed over resumes (validation and probes included);
- ``train_images_per_s``: images per second over the training epochs alone (data loading included), all ranks;
- ``gflops_per_image``: training FLOPs per image (forward and backward; the optimiser adds no matmul FLOPs),
  averaged over the run: :class:`torch.utils.flop_counter.FlopCounterMode` counts the first step of every epoch
  and that count stands for the epoch's images, so a method whose step changes between epochs (SG-MAE's switch
  to informed masks) is charged for both phases; per rank, so it does not depend on the number of GPUs (``null``
  under ``compile=true``);
- ``peak_memory_mb`` with ``memory_kind``: ``cuda_max_allocated`` (allocator peak) on a GPU, else ``cpu_max_rss``
  (the process's peak resident set, which includes the data and the Python runtime);
- ``params`` (all trained modules), ``encoder_params`` (what evaluation uses; ``null`` for the dVAE);
  ``epochs``, ``steps``, ``images_seen`` (all ranks); ``device``, ``precision``.

Counters survive a resume through the checkpoint (the callback's state), so a preempted run reports its total.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from mimzoo.data import primary_view
from mimzoo.rundir import atomic_write

# Dense peak TFLOP/s (bf16, fp32 without tensor cores) by a part of the CUDA device name, the first match winning:
# what model-FLOP utilisation is measured against (``make bench``) and estimated with (experiments/full_length.py).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def dense_peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s at this precision (``bf16-mixed``, ``32-true``); None for a device not listed."""
    for part, bf16, fp32 in PEAK_TFLOPS:
        if part in device_name:
            return (bf16 if precision.startswith("bf16") else fp32) * 1e12
    return None


class RunCost(Callback):
    def __init__(self, path: str | Path, count_flops: bool = True):
        self.path = Path(path)
        self.count_flops = count_flops
        self.state = {
            "wall_clock_s": 0.0,
            "train_time_s": 0.0,
            "images_seen": 0,
            "flops": 0.0,
            "flops_per_image": None,
            "counted_epoch": -1,
        }
        self._fit_start = self._epoch_start = None
        self._counter: FlopCounterMode | None = None
        self._counted_batch = 0

    # --- resumable counters ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = dict(self.state)
        if self._fit_start is not None:  # a checkpoint mid-fit carries the time spent so far
            state["wall_clock_s"] += time.perf_counter() - self._fit_start
        if self._epoch_start is not None:
            state["train_time_s"] += time.perf_counter() - self._epoch_start
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.update(state_dict)
        if "flops" not in state_dict and state_dict.get("flops_per_image") is not None:
            # a checkpoint that counted one step only: that count stood for every image
            self.state["flops"] = state_dict["flops_per_image"] * state_dict["images_seen"]

    # --- timing ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        self._fit_start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._epoch_start is not None:  # (a resume mid-epoch starts no epoch: its time so far is in the state)
            self.state["train_time_s"] += time.perf_counter() - self._epoch_start
        self._epoch_start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count_flops and self.state["counted_epoch"] != trainer.current_epoch and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counted_batch = primary_view(batch[0]).shape[0]
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images = primary_view(batch[0]).shape[0] * trainer.world_size
        self.state["images_seen"] += images
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.state["flops_per_image"] = self._counter.get_total_flops() / self._counted_batch
            self.state["counted_epoch"] = trainer.current_epoch
            self._counter = None
        if self.state["flops_per_image"] is not None:
            self.state["flops"] += self.state["flops_per_image"] * images

    def on_exception(self, trainer, pl_module, exception):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_fit_end(self, trainer, pl_module):
        self.state["wall_clock_s"] += time.perf_counter() - self._fit_start
        self._fit_start = None
        if trainer.is_global_zero:
            atomic_write(self.path, lambda f: f.write(json.dumps(self.summary(trainer, pl_module), indent=2).encode()))

    def summary(self, trainer, pl_module) -> dict:
        device = pl_module.device
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "cpu_max_rss"  # Linux: KiB
        flops = self.state["flops"] / self.state["images_seen"] if self.state["flops_per_image"] is not None else None
        train_time = self.state["train_time_s"]
        return {
            "wall_clock_s": round(self.state["wall_clock_s"], 2),
            "train_images_per_s": round(self.state["images_seen"] / train_time, 2) if train_time else None,
            "gflops_per_image": None if flops is None else float(f"{flops / 1e9:.6g}"),
            "peak_memory_mb": round(peak, 1),
            "memory_kind": kind,
            "params": sum(p.numel() for p in pl_module.parameters()),
            "encoder_params": sum(p.numel() for p in pl_module.eval_encoder.parameters())
            if pl_module.has_features
            else None,  # a tokenizer stage (the dVAE) has no encoder to transfer
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "images_seen": self.state["images_seen"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(trainer.precision),
        }
