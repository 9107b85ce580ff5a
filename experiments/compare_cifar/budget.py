"""Each method's offline top-1 against its training budget, from the reports of the same preset at several budgets.

Reads the ``report.csv`` that ``mimzoo-report`` wrote for each budget and draws one line per method over the images
it saw, with the untrained network (the floor) as a dotted line; prints the same numbers as a Markdown table.

    python experiments/compare_cifar/budget.py experiments/compare_cifar experiments/compare_cifar/pass1 \
        experiments/compare_cifar/pass2 --out experiments/compare_cifar/budget.png
"""

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROTOCOLS = ("kNN top-1 (offline)", "linear top-1 (offline)")
NAMES = {"mae": "MAE", "convmae": "ConvMAE", "sgmae": "SG-MAE", "simmim": "SimMIM", "beit": "BEiT", "ibot": "iBOT"}


def read(folders: list[Path]) -> tuple[dict, dict]:
    """``{method: {images seen: {protocol: top-1}}}`` and the floor's ``{protocol: top-1}`` (the same at every
    budget: the untrained network does not depend on it)."""
    curves, floor = {}, {}
    for folder in folders:
        with (folder / "report.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                top1 = {p: float(row[p]) for p in PROTOCOLS if row[p]}
                if row["compare"] == "untrained":
                    floor = top1
                elif row["compare"] in NAMES:
                    curves.setdefault(NAMES[row["compare"]], {})[int(row["images seen"])] = top1
    return curves, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding a compare_cifar report.csv")
    parser.add_argument("--out", type=Path, required=True, help="the plot (PNG)")
    args = parser.parse_args()
    curves, floor = read(args.folders)
    budgets = sorted({n for points in curves.values() for n in points})
    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(11, 4.2), sharex=True)
    # One colour per method in both panels; the legend in the order of the largest budget's first protocol.
    order = sorted(curves, key=lambda m: -curves[m][max(curves[m])].get(PROTOCOLS[0], 0))
    for ax, protocol in zip(axes, PROTOCOLS):
        for i, method in enumerate(order):
            xs = [n for n in sorted(curves[method]) if protocol in curves[method][n]]
            ax.plot(xs, [100 * curves[method][n][protocol] for n in xs], marker="o", color=f"C{i}", label=method)
        if protocol in floor:
            ax.axhline(100 * floor[protocol], color="black", linestyle=":", label="untrained network (floor)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"{n / 50000:.2g} passes\n{n:,}" for n in budgets])
        ax.set_title(protocol.replace(" (offline)", ""))
        ax.set_xlabel("images seen in pre-training")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("CIFAR-10, ViT-T-size backbones, one seed: offline top-1 by pre-training budget")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("| method | " + " | ".join(f"{p.split()[0]} at {n:,} images" for p in PROTOCOLS for n in budgets) + " |")
    print("|---|" + "---|" * (len(PROTOCOLS) * len(budgets)))
    for method, points in [("untrained (floor)", {n: floor for n in budgets}), *sorted(curves.items())]:
        cells = [f"{100 * points[n][p]:.2f}%" if p in points.get(n, {}) else "" for p in PROTOCOLS for n in budgets]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
