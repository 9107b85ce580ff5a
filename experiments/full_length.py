"""What a sweep's runs would cost at full length on one GPU, from the FLOPs each run counted (cost.json).

FLOPs per training image are measured (torch's FLOP counter, cost.json); the GPU's utilisation is not (no GPU
here), so the estimate is given at two model-FLOP utilisations, as a range. Each run is named by the overrides
that set it apart from the others (its method, its mask ratio).

    python experiments/full_length.py <sweep dir> [--epochs 800] [--images 50000]
"""

import argparse
import json
from pathlib import Path

from mimzoo.callbacks.cost import dense_peak_flops

PEAK = dense_peak_flops("H100", "bf16-mixed")  # SXM, dense
MFU = (0.4, 0.1)  # a well-fed large ViT reaches ~40%; a ViT-T on 32px images, small matmuls, far less


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep")
    parser.add_argument("--epochs", type=int, default=800)
    parser.add_argument("--images", type=int, default=50000, help="images per epoch (CIFAR-10's training split)")
    args = parser.parse_args()
    images = args.epochs * args.images
    runs = sorted(p.parent for p in Path(args.sweep).glob("*/cost.json"))
    overrides = {
        run: dict(
            line.lstrip("- ").split("=", 1) for line in (run / ".hydra" / "overrides.yaml").read_text().splitlines()
        )
        for run in runs
    }
    swept = {
        key
        for key in {k for o in overrides.values() for k in o}
        if len({o[key] for o in overrides.values() if key in o}) > 1
    }
    print(
        f"| run | setting | GFLOPs/img (train step) | PFLOPs for {args.epochs} epochs | "
        f"H100 minutes of compute at {MFU[0]:.0%} / {MFU[1]:.0%} MFU |"
    )
    print("|---|---|---|---|---|")
    for run in runs:
        cost = json.loads((run / "cost.json").read_text())
        if not cost.get("gflops_per_image"):
            continue
        setting = ", ".join(f"{k}={v}" for k, v in overrides[run].items() if k in swept) or run.name
        flops = cost["gflops_per_image"] * 1e9 * images
        minutes = [flops / (PEAK * u) / 60 for u in MFU]
        print(
            f"| {run.name} | {setting} | {cost['gflops_per_image']:.3f} | {flops / 1e15:,.1f} | "
            f"{minutes[0]:.1f} - {minutes[1]:.1f} |"
        )


if __name__ == "__main__":
    main()
