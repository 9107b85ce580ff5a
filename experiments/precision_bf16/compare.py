"""Two runs of the same config in two precisions: their train-loss curves overlaid (plot) and a table of the
step-matched loss gap, final losses, online kNN and throughput.

    python experiments/precision_bf16/compare.py <fp32 run dir> <bf16 run dir> <out dir>
"""

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def main(fp32: str, bf16: str, out: str) -> None:
    runs = {"fp32 (32-true)": Path(fp32), "bf16 (bf16-mixed)": Path(bf16)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loss = {name: series(run, "train/loss") for name, run in runs.items()}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (name, curve), style in zip(loss.items(), ("-", "--")):
        ax.plot(list(curve), list(curve.values()), style, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (norm-pixel MSE)")
    ax.set_title("make demo's MAE, same seed: fp32 vs bf16 autocast")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)

    a, b = loss.values()
    steps = sorted(set(a) & set(b))
    gaps = [abs(a[s] - b[s]) / a[s] for s in steps]
    rows = []
    for name, run in runs.items():
        cost = json.loads((run / "cost.json").read_text())
        last = {k: list(series(run, k).values())[-1] for k in ("train/loss", "val/loss", "probe/knn_top1")}
        rows.append(
            [
                name,
                f"{last['train/loss']:.4f}",
                f"{last['val/loss']:.4f}",
                f"{100 * last['probe/knn_top1']:.2f}%",
                f"{cost['train_images_per_s']:.0f}",
                f"{cost['wall_clock_s'] / 60:.1f}",
            ]
        )
    table = [
        "| run | final train loss | final val loss | online kNN top-1 | train img/s | wall-clock (min) |",
        "|---|---|---|---|---|---|",
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    table.append(
        f"\nStep-matched train loss, relative gap |fp32 - bf16| / fp32 over {len(steps)} logged steps: "
        f"mean {100 * sum(gaps) / len(gaps):.2f}%, max {100 * max(gaps):.2f}%."
    )
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main(*sys.argv[1:4])
