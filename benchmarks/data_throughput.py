"""Training-loader throughput (img/s of the loader alone, no model): the PIL path (``data.loader=pil``, per image,
in the main process) against ``data.loader=device`` (whole batches augmented with tensor ops), for MAE's view and
iBOT's multi-crop. The two alternate round by round in one process, so a load that comes and goes on a shared
machine hits both; the ratio is the median of the per-round ratios.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py                       # CIFAR-10 under $MIMZOO_DATA
    python benchmarks/data_throughput.py --device cuda --batch 1024             # the device path on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mimzoo.data import MIMDataModule


def images_per_second(loader, batches: int, batch_size: int, sync) -> float:
    done, start = 0, time.perf_counter()
    epoch = 0
    while done < batches:
        loader.sampler.set_epoch(epoch)
        for _ in zip(range(batches - done), loader):
            done += 1
        epoch += 1
    sync()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="cifar10", help="cifar10 | cifar100 | cifar10-mini | imagefolder")
    parser.add_argument("--root", default=os.environ.get("MIMZOO_DATA", "./data"))
    parser.add_argument("--device", default="cpu", help="where the device path's data and augmentation live")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8, help="batches per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-number", type=int, default=10, help="iBOT local crops (the ViT-S recipe's 10)")
    parser.add_argument("--views", default="mae,ibot")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # iBOT's views at 32 px with patch 4 (what iBOT's train_views gives): local crops of 12 px
    cases = {
        "mae": None,
        "ibot": {
            "local_number": args.local_number,
            "global_scale": (0.25, 1.0),
            "local_scale": (0.05, 0.25),
            "local_size": 12,
            "blur": True,
        },
    }
    print(
        f"loader throughput, {args.data}, batch {args.batch}, {args.batches} batches x {args.rounds} rounds, "
        f"torch threads {torch.get_num_threads()}; device path on {device}"
    )
    print(f"{'views':<8}{'pil img/s':>12}{'device img/s':>15}{'device/pil':>12}")
    for name in args.views.split(","):
        loaders = {}
        for kind in ("pil", "device"):  # the PIL path per image in this process (num_workers=0): one core each
            dm = MIMDataModule(name=args.data, root=args.root, batch_size=args.batch, num_workers=0, loader=kind)
            dm.train_views = cases[name]
            loaders[kind] = dm.train_dataloader() if kind == "pil" else dm.device_dataloader(device, seed=0)
        pil, fast = loaders["pil"], loaders["device"]
        images_per_second(fast, 1, args.batch, sync)  # warm-up (first calls, allocator)
        rates = {"pil": [], "device": []}
        for _ in range(args.rounds):
            rates["pil"].append(images_per_second(pil, args.batches, args.batch, sync))
            rates["device"].append(images_per_second(fast, args.batches, args.batch, sync))
        ratio = statistics.median(d / p for d, p in zip(rates["device"], rates["pil"]))
        print(
            f"{name:<8}{statistics.median(rates['pil']):>12.0f}{statistics.median(rates['device']):>15.0f}"
            f"{ratio:>11.2f}x"
        )


if __name__ == "__main__":
    main()
