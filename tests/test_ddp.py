"""DDP for real: two CPU processes with gloo end with identical weights after different batches
(MAE, also with ``data.loader=device``), and with an identical EMA teacher and all-reduced centres (iBOT)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two processes each


def run_two_ranks(tmp_path, preset: str, *overrides: str):
    """``ddp_worker.py`` on 2 gloo processes: the tiny ``preset`` (mae | ibot) plus Hydra ``overrides``."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path), preset, *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    r0, r1 = run_two_ranks(tmp_path, "mae")
    assert r0["world_size"] == r1["world_size"] == 2
    assert not torch.equal(r0["labels"], r1["labels"])  # each rank drew its own shard of the data
    assert r0["state"].keys() == r1["state"].keys()
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    # Training moved the weights, so equality is not two untouched copies.
    name = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(r0["initial"][name], r0["state"][name])


def test_two_process_ibot_teacher_and_centres_identical(tmp_path):
    """Ranks see different crops, so centres updated from local batches alone would differ (the last
    update comes after DDP's last buffer broadcast): equality shows they are all-reduced."""
    r0, r1 = run_two_ranks(tmp_path, "ibot")
    assert not torch.equal(r0["labels"], r1["labels"])
    teacher = [k for k in r0["state"] if k.startswith(("teacher.", "teacher_head."))]
    assert len(teacher) > 20
    for name in teacher + ["center", "center_patch"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert r0["state"]["center"].abs().sum() > 0
    name = "teacher.blocks.0.attn.qkv.weight"
    assert not torch.equal(r0["initial"][name], r0["state"][name])  # the EMA moved the teacher


def test_two_process_ddp_with_the_device_loader(tmp_path):
    """``data.loader=device`` under DDP: each rank augments its own shard (the PIL path's shard of the same
    epoch order) and the ranks end identical."""
    from mimzoo.data import ResumableSampler
    from mimzoo.data.datasets import CIFAR

    r0, r1 = run_two_ranks(tmp_path, "mae", "data.loader=device")
    targets = CIFAR(os.environ["MIMZOO_DATA"], "cifar10-mini").targets
    for rank, out in enumerate((r0, r1)):
        shard = [i for _, i in ResumableSampler(range(512), num_replicas=2, rank=rank, seed=0)][:16]
        assert torch.equal(out["labels"], targets[shard]), rank
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
