"""Teacher entropy and KL(teacher || student) per step of the two ibot_demo runs (from their metrics.csv).

python experiments/ibot_demo/plot.py <run dir warm-up 30 epochs> <run dir warm-up 1 epoch> <out.png>
"""

import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(run_dir, key):
    rows = [r for r in csv.DictReader(open(f"{run_dir}/metrics.csv")) if r.get(key)]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def main(default_run, fast_run, out):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for run, label in (
        (default_run, "teacher temp 0.04 -> 0.07 over 30 epochs (iBOT)"),
        (fast_run, "... over 1 epoch (150 steps)"),
    ):
        for ax, key in zip(axes, ("train/teacher_entropy", "train/teacher_student_kl")):
            ax.plot(*series(run, key), label=label)
    axes[0].axhline(math.log(1024), color="grey", ls="--", lw=1, label="log K (uniform teacher)")
    axes[0].set_title("teacher [CLS] entropy")
    axes[1].set_title("KL(teacher || student)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:4])
