"""``mimzoo-report``: the ablation table and plot of a Hydra multirun, offline.

Every run directory of a sweep keeps ``.hydra/overrides.yaml`` and Lightning's ``metrics.csv``,
so a table like MAE's Table 1 / Fig. 5 can be rebuilt from disk alone, without W&B.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

DEFAULT_METRICS = ("probe/knn_top1", "probe/linear_top1", "val/loss")
NOT_METRICS = {"epoch", "step"}


class ReportError(ValueError):
    """A user error (bad directory, unknown metric): reported as one line, without a traceback."""


@dataclass
class Run:
    name: str
    overrides: dict = field(default_factory=dict)   # key -> typed value (int/float/str/bool/None)
    shown: dict = field(default_factory=dict)       # key -> value as written on the command line
    last: dict = field(default_factory=dict)        # metric -> last logged value
    best: dict = field(default_factory=dict)        # metric -> best logged value
    note: str = ""


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def higher_is_better(metric: str) -> bool:
    return any(s in metric for s in ("top1", "top5", "acc"))


def read_metrics(path: Path) -> tuple[dict, dict, float | None]:
    """Last and best value of every metric, and the last epoch; CSVLogger writes sparse rows, so
    empty cells are skipped."""
    last, seen = {}, {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, text in row.items():
                value = _number(text or "")
                if value is not None:
                    last[key] = value
                    seen.setdefault(key, []).append(value)
    best = {k: (max if higher_is_better(k) else min)(v) for k, v in seen.items() if k not in NOT_METRICS}
    metrics = {k: v for k, v in last.items() if k not in NOT_METRICS}
    return metrics, best, max(seen.get("epoch", []), default=None)


def _unfinished(run_dir: Path, last_epoch: float | None) -> str:
    """Flag runs stopped before ``trainer.max_epochs`` (killed, preempted): their final value misleads."""
    config = run_dir / ".hydra" / "config.yaml"
    if last_epoch is None or not config.exists():
        return ""
    cfg = OmegaConf.load(config)
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if OmegaConf.select(cfg, "trainer.max_steps", default=-1) not in (-1, None) or not max_epochs:
        return ""
    return f"stopped at epoch {int(last_epoch) + 1} of {max_epochs}" if last_epoch + 1 < max_epochs else ""


def load_run(run_dir: Path, root: Path) -> Run:
    parser = OverridesParser.create()
    lines = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")) or []
    run = Run(name=run_dir.relative_to(root).as_posix() or ".")
    for o in parser.parse_overrides([str(line) for line in lines]):
        run.overrides[o.key_or_group] = o.value()
        run.shown[o.key_or_group] = o.get_value_element_as_str()
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        run.note = "failed or not started: no metrics.csv"
        return run
    run.last, run.best, last_epoch = read_metrics(metrics)
    run.note = _unfinished(run_dir, last_epoch) if run.last else "no metrics logged"
    return run


def load_runs(root: Path) -> list[Run]:
    """Every directory under ``root`` holding ``.hydra/overrides.yaml`` is a run."""
    if not root.is_dir():
        raise ReportError(f"no such directory: {root}")
    dirs = sorted({p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"})
    if not dirs:
        raise ReportError(f"no runs found under {root} (expected <run>/.hydra/overrides.yaml, as written by "
                          "`mimzoo-train -m ...`)")
    return [load_run(d, root) for d in dirs]


def split_overrides(runs: list[Run]) -> tuple[list[str], dict]:
    """Swept keys (values differ between runs, in command-line order) and the constant ones."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    swept = [k for k in keys if len({r.shown.get(k) for r in runs}) > 1]
    constant = {k: runs[0].shown[k] for k in keys if k not in swept}
    return swept, constant


def choose_metric(runs: list[Run], metric: str | None) -> str:
    available = sorted({k for r in runs for k in r.last})
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if m in available), None)
        if metric is None:
            raise ReportError(f"none of the default metrics {list(DEFAULT_METRICS)} was logged; "
                              f"pick one with --metric from: {', '.join(available) or '(no metrics at all)'}")
    elif metric not in available:
        raise ReportError(f"unknown metric {metric!r}; available: {', '.join(available) or '(no metrics at all)'}")
    return metric


def _sort_key(value):
    """Numbers numerically, then strings, then missing values; never compare across types."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (2, 0, "") if value is None else (1, 0, str(value))


def is_numeric(runs: list[Run], key: str) -> bool:
    values = [r.overrides.get(key) for r in runs]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def metric_columns(runs: list[Run], metric: str) -> list[str]:
    """The chosen metric and its best value first, then losses and the probes that were logged."""
    available = {k for r in runs for k in r.last}
    probes = sorted(k for k in available if k.startswith("probe/") and not k.endswith("_loss"))
    wanted = [metric, f"best {metric}", "val/loss", "train/loss", *probes]
    return [c for c in dict.fromkeys(wanted) if c in available or c == f"best {metric}"]


def build_rows(runs: list[Run], swept: list[str], columns: list[str]) -> list[dict]:
    runs = sorted(runs, key=lambda r: ([_sort_key(r.overrides.get(k)) for k in swept], r.name))
    rows = []
    for r in runs:
        row = {"run": r.name, **{k: r.shown.get(k, "") for k in swept}}
        for c in columns:
            value = r.best.get(c[5:]) if c.startswith("best ") else r.last.get(c)
            row[c] = "" if value is None else value
        row["note"] = r.note
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: list[str], caption: str) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{caption}\n"


def plot(runs: list[Run], swept: list[str], metric: str, x: str, path: Path, title: str) -> None:
    """MAE Fig. 5 style: the metric against ``x``, one line per setting of the other swept keys;
    a bar chart when ``x`` is the only, categorical, key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in swept if k != x]
    done = sorted((r for r in runs if metric in r.last),
                  key=lambda r: ([_sort_key(r.overrides.get(k)) for k in others + [x]], r.name))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not others and not is_numeric(runs, x):
        ax.bar([r.shown.get(x, "") for r in done], [r.last[metric] for r in done])
    else:
        numeric = is_numeric(runs, x)
        for setting, group in groupby(done, key=lambda r: tuple(r.shown.get(k, "") for k in others)):
            group = list(group)
            xs = [r.overrides[x] if numeric else r.shown.get(x, "") for r in group]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, setting)) or None
            ax.plot(xs, [r.last[metric] for r in group], marker="o", linestyle="-" if numeric else "none", label=label)
        if others:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: str | Path, metric: str | None = None, x: str | None = None, out: str | Path | None = None) -> dict:
    """Write report.md, report.csv and (when something was swept) report.png; returns paths and table."""
    root = Path(root)
    runs = load_runs(root)
    swept, constant = split_overrides(runs)
    metric = choose_metric(runs, metric)
    if x is not None and x not in swept:
        raise ReportError(f"--x {x!r} is not a swept key; swept keys: {', '.join(swept) or '(none)'}")
    if x is None:
        x = next((k for k in swept if is_numeric(runs, k)), swept[0] if swept else None)

    columns = metric_columns(runs, metric)
    header = ["run", *swept, *columns, "note"]
    rows = build_rows(runs, swept, columns)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv"}

    fixed = ", ".join(f"`{k}={v}`" for k, v in constant.items()) or "none"
    caption = (f"{len(runs)} runs in `{root}`; metrics are the last logged values. "
               f"Constant overrides: {fixed}.")
    table = markdown(rows, header, caption)
    paths["md"].write_text(f"# {metric} by {', '.join(swept) or 'run'}\n\n{table}")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    if x is not None and any(metric in r.last for r in runs):
        paths["png"] = out / "report.png"
        plot(runs, swept, metric, x, paths["png"], f"{metric} vs {x} ({'/'.join(root.resolve().parts[-2:])})")
    return {"paths": paths, "table": table, "metric": metric, "x": x, "swept": swept, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mimzoo-report", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/<date>/<time>")
    parser.add_argument("--metric", help=f"column of metrics.csv to report (default: first of {', '.join(DEFAULT_METRICS)})")
    parser.add_argument("--x", help="swept key for the plot's x axis (default: the first numeric swept key)")
    parser.add_argument("--out", help="output folder (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir, args.metric, args.x, args.out)
    except ReportError as e:
        parser.error(str(e))
    print(result["table"])
    for kind, path in result["paths"].items():
        print(f"mimzoo: report {kind:<4}{path}")


if __name__ == "__main__":
    main()
