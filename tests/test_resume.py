"""Exact resume (slow tier): every method, 8 steps straight vs cut + resumed from ``last.ckpt``, at an epoch
boundary (cut at step 4, the end of epoch 0) and mid-epoch (cut at step 6, batch 2 of 4 of epoch 1; for MAE and
iBOT also from a step checkpoint and with two data-loading workers, and both again with ``data.loader=device``),
must end with bit-identical weights, buffers (iBOT's centres, SG-MAE's switch state), optimiser state and
metrics.csv values (all but ThroughputMonitor's timings and counts). The cut is ``trainer.max_steps``, which
stops a run early without touching its epoch-laid schedules. (Signals mid-epoch: tests/test_preemption.py.)

One subprocess per method runs its five trainings (tests/train_sequence.py) to save interpreter starts.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_IBOT

HERE = Path(__file__).parent

# Two epochs of four batches of 64 (cifar10-mini), one validation batch per epoch, a row per step in metrics.csv.
COMMON = [
    "logger=csv",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "probe.knn.enabled=false",
    "recon.enabled=false",
]
TINY_CONVMAE = [o for o in TINY if not o.startswith("model/encoder=")] + ["model=convmae", "model/convmae_encoder=test"]
TINY_DVAE = [
    "model=dvae",
    "data=cifar10_mini",
    "data.batch_size=64",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "model.vae.num_tokens=64",
    "model.vae.hidden_dim=16",
    "model.vae.code_dim=16",
    "model.vae.num_resblocks=0",
    "optim.lr=3e-3",
]


def method_overrides(method: str, tokenizer: Path) -> list[str]:
    return {
        "mae": TINY,
        "convmae": TINY_CONVMAE,
        "simmim": ["model=simmim", *[o for o in TINY if not o.startswith("model.decoder")]],
        "sgmae": [*TINY, "model=sgmae", "model.probe_size=64", "model.start_epoch=1"],  # informed masks in epoch 1
        "ibot": TINY_IBOT,
        "mae_device": [*TINY, "data.loader=device"],  # whole batches augmented on the training device
        "ibot_device": [*TINY_IBOT, "data.loader=device"],
        "dvae": TINY_DVAE,
        "beit": [
            "model=beit",
            *[o for o in TINY if not o.startswith("model.decoder")],
            f"model.tokenizer.ckpt={tokenizer}",
            "model.num_tokens=64",
        ],
    }[method]


METHODS = ["mae", "convmae", "simmim", "sgmae", "ibot", "dvae", "beit", "mae_device", "ibot_device"]
STEP_CHECKPOINTS = ["checkpoint.every_n_epochs=null", "checkpoint.every_n_train_steps=2"]
CUTS = {
    "epoch": (4, []),  # end of epoch 0: the epoch-end checkpoint
    "mid": (6, []),  # batch 2 of 4 of epoch 1: the checkpoint max_steps leaves (saved by epoch-end hooks)
    # batch 2 of 4 of epoch 1 again: a step checkpoint, and two loading workers each side of the cut (order and
    # augmentation do not depend on them)
    "mid-workers": (6, [*STEP_CHECKPOINTS, "data.num_workers=2"]),
}
WORKER_CUTS = ("mae", "ibot")  # the augmentations with the most randomness: MAE's crops, iBOT's multi-crop


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """An (untrained) tiny dVAE checkpoint, as stage 1 leaves it, for BEiT's targets."""
    from mimzoo.methods import DVAE

    torch.manual_seed(0)
    model = DVAE(vae=dict(num_tokens=64, downsample=4, hidden_dim=16, code_dim=16, num_resblocks=0))
    path = tmp_path_factory.mktemp("dvae") / "dvae.ckpt"
    torch.save(
        {
            "mimzoo": {"method": "mimzoo.methods.dvae.DVAE"},
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
        },
        path,
    )
    return path


def run_sequence(jobs: list, timeout: float = 1200) -> None:
    cmd = [sys.executable, str(HERE / "train_sequence.py"), json.dumps(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(
            f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two equally nested containers of tensors and numbers (inf when they differ in keys,
    shapes or types)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if a.dtype == torch.bool or not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return 0.0 if torch.equal(a, b) else (a.double() - b.double()).abs().max().item()
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def differences(straight: dict, resumed: dict) -> dict:
    """Max |difference| per part of two checkpoints: weights, buffers (non-parameter state), optimiser state."""
    sd_a, sd_b = straight["state_dict"], resumed["state_dict"]
    buffers = [k for k in sd_a if k.rsplit(".", 1)[-1].startswith(("center", "sg_"))]
    weights = [k for k in sd_a if k not in buffers]
    return {
        "global_step": max_abs_diff(straight["global_step"], resumed["global_step"]),
        "weights": max_abs_diff({k: sd_a[k] for k in weights}, {k: sd_b.get(k) for k in weights}),
        "buffers": max_abs_diff({k: sd_a[k] for k in buffers}, {k: sd_b.get(k) for k in buffers}),
        "optimizer": max_abs_diff(straight["optimizer_states"], resumed["optimizer_states"]),
    }


# ThroughputMonitor's columns: wall-clock times and rates, and counts of what this process has run (they restart
# with the process)
THROUGHPUT = ("batches", "samples", "items", "lengths", "time")


def metric_values(*paths: Path) -> dict:
    """``{(step, column): [values...]}`` of one or more metrics.csv files (later files after earlier ones),
    ThroughputMonitor's columns left out."""
    values: dict = {}
    for path in paths:
        if not path.exists():  # a resumed run that logged nothing (and deleted what was there) has none
            continue
        for row in csv.DictReader(open(path)):
            for col, v in row.items():
                throughput = col.split("/", 1)[-1] in THROUGHPUT or col.endswith("_per_sec")
                if col not in ("step", "epoch") and v != "" and not throughput:
                    values.setdefault((int(row["step"]), col), []).append(float(v))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical(method, tokenizer, tmp_path):
    overrides = [*method_overrides(method, tokenizer), *COMMON]
    straight = tmp_path / "straight"
    jobs = [[*overrides, f"hydra.run.dir={straight}"]]
    cuts = [cut for cut in CUTS if cut != "mid-workers" or method in WORKER_CUTS]
    for cut in cuts:
        step, extra = CUTS[cut]
        run = tmp_path / cut
        jobs += [
            [*overrides, *extra, f"trainer.max_steps={step}", f"hydra.run.dir={run}"],
            {"copy": [str(run / "metrics.csv"), str(run / "metrics_first.csv")]},
            [*overrides, *extra, "ckpt_path=last", f"hydra.run.dir={run}"],
        ]
    run_sequence(jobs)

    reference = load(straight / "checkpoints" / "last.ckpt")
    assert reference["global_step"] == 8
    expected = metric_values(straight / "metrics.csv")
    report, failures = {}, []
    for cut in cuts:
        run = tmp_path / cut
        diff = differences(reference, load(run / "checkpoints" / "last.ckpt"))
        got = metric_values(run / "metrics_first.csv", run / "metrics.csv")
        # metrics.csv of the resumed run may or may not keep the first half's rows: count each value once
        got = {k: sorted(set(v)) for k, v in got.items()}
        want = {k: sorted(set(v)) for k, v in expected.items()}
        # A run stopped by max_steps ends its partial epoch: it logs epoch-end values (iBOT's collapse flag, SG-MAE's
        # probe) at its last step, which the straight run logs at the epoch's real end (and the resumed run too).
        extra_at_stop = {k for k in got.keys() - want.keys() if k[0] == CUTS[cut][0] - 1}
        wrong = sorted(k for k in want.keys() | got.keys() - extra_at_stop if want.get(k) != got.get(k))
        diff["metrics"] = [f"step {s} {c}: {want.get((s, c))} vs {got.get((s, c))}" for s, c in wrong][:6]
        report[cut] = diff
        if any(v != 0 for k, v in diff.items() if k != "metrics") or wrong:
            failures.append(cut)
    print(f"\nresume {method}: {json.dumps(report, indent=1)}")
    assert not failures, f"{method}: resumed runs differ from the straight one: {report}"
