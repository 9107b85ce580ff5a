"""``mimzoo-report``: the ablation table and plot of a Hydra multirun, offline.

Every run directory of a sweep keeps ``.hydra/overrides.yaml`` and Lightning's ``metrics.csv``,
so a table like MAE's Table 1 / Fig. 5 can be rebuilt from disk alone, without W&B. Beside them a run
may hold ``eval/<protocol>/results.json`` (``mimzoo-eval``: the offline kNN / linear / fine-tune
top-1, the table's main columns), ``cost.json`` (what training cost) and reconstruction or
informed-mask panels; the preset's ``paper:`` block (in ``.hydra/config.yaml``) gives the paper's
numbers, shown in their own columns and plot series, never mixed with ours.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mimzoo.offline_eval import has_encoder
from mimzoo.rundir import atomic_write
from mimzoo.runs import CONFIG_DIR

# Offline protocols (``<run>/eval/<protocol>/results.json``) as metrics ``eval/<protocol>_top1``, in the
# order the default metric prefers them; the paper's headline protocols first.
PROTOCOLS = {"linear": "linear", "finetune": "fine-tune", "knn": "kNN"}
OFFLINE = {f"eval/{p}_top1": f"{name} top-1 (offline)" for p, name in PROTOCOLS.items()}
DEFAULT_METRICS = (*OFFLINE, "probe/knn_top1", "probe/linear_top1", "val/loss")
# cost.json key -> (column, scale); memory_kind, device and precision go to the caption when every run agrees.
COSTS = {
    "wall_clock_s": ("wall-clock (min)", 1 / 60),
    "train_images_per_s": ("img/s", 1),
    "gflops_per_image": ("GFLOPs/img (train step)", 1),
    "peak_memory_mb": ("peak memory (MB)", 1),
    "params": ("params (M)", 1e-6),
    "encoder_params": ("encoder params (M)", 1e-6),
    "epochs": ("epochs", 1),
    "images_seen": ("images seen", 1),
}
COST_CONTEXT = ("memory_kind", "device", "precision")
PANELS = ("informed_masks", "reconstructions")  # per run, the newest PNG of the first folder that has one
NOT_METRICS = {"epoch", "step"}


class ReportError(ValueError):
    """A user error (bad directory, unknown metric): reported as one line, without a traceback."""


@dataclass
class Run:
    name: str
    overrides: dict = field(default_factory=dict)  # key -> typed value (int/float/str/bool/None)
    shown: dict = field(default_factory=dict)  # key -> value as written on the command line
    last: dict = field(default_factory=dict)  # metric -> last logged value
    best: dict = field(default_factory=dict)  # metric -> best logged value
    note: str = ""
    config: dict = field(default_factory=dict)  # .hydra/config.yaml, unresolved ({} when absent)
    cost: dict = field(default_factory=dict)  # cost.json
    panel: Path | None = None  # newest reconstruction / informed-mask picture
    stage: bool = False  # a prerequisite stage (BEiT's dVAE): no encoder, not a point
    floor: bool = False  # the untrained network (trainer.max_steps=0)


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


def _unfinished(cfg, last_epoch: float | None) -> str:
    """Flag runs stopped before ``trainer.max_epochs`` (killed, preempted): their final value misleads."""
    if last_epoch is None or not cfg:
        return ""
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
    config = run_dir / ".hydra" / "config.yaml"
    run.config = OmegaConf.load(config) if config.exists() else OmegaConf.create()
    run.cost = _read_json(run_dir / "cost.json")
    run.panel = newest_panel(run_dir)
    run.stage = is_stage(run.config)
    offline = {f"eval/{p}_top1": _read_json(run_dir / "eval" / p / "results.json").get("top1") for p in PROTOCOLS}
    offline = {k: float(v) for k, v in offline.items() if v is not None}
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        run.last, run.best = dict(offline), dict(offline)
        run.floor = run.cost.get("steps") == 0 and (run_dir / "checkpoints" / "last.ckpt").is_file()
        run.note = "untrained (trainer.max_steps=0)" if run.floor else "failed or not started: no metrics.csv"
        return run
    run.last, run.best, last_epoch = read_metrics(metrics)
    run.note = _unfinished(run.config, last_epoch) if run.last else "no metrics logged"
    if run.stage and not run.note:
        run.note = "prerequisite stage (no encoder to evaluate)"
    run.last.update(offline)
    run.best.update(offline)
    return run


def is_stage(config: DictConfig) -> bool:
    """A prerequisite stage: a method without features (BEiT's dVAE). A method this environment cannot import (a
    user's own module, not on the path here) is a point of the sweep: the report reads files, it runs no model."""
    if OmegaConf.select(config, "model._target_") is None:
        return False
    try:
        return not has_encoder(config)
    except ImportError:
        return False


def _read_json(path: Path) -> dict:
    """A result file of another tool; absent is normal (not evaluated yet), unreadable is the user's to fix."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}); delete it and re-run what wrote it"
        ) from None


def newest_panel(run_dir: Path) -> Path | None:
    """The last picture a run saved (``epoch_XXXX.png``, zero-padded, so the names sort by epoch); SG-MAE's
    informed-mask panel first, as it also holds the reconstruction."""
    for folder in PANELS:
        pictures = sorted((run_dir / folder).glob("*.png"))
        if pictures:
            return pictures[-1]
    return None


def load_runs(root: Path) -> list[Run]:
    """Every directory under ``root`` holding ``.hydra/overrides.yaml`` is a run."""
    if not root.is_dir():
        raise ReportError(f"no such directory: {root}")
    found = {p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    # A run's own evaluations (<run>/eval/<protocol>/.hydra) are Hydra runs too, but not points of the sweep.
    dirs = sorted(d for d in found if not any(parent in found for parent in d.parents))
    if not dirs:
        raise ReportError(
            f"no runs found under {root} (expected <run>/.hydra/overrides.yaml, as written by `mimzoo-train -m ...`)"
        )
    return [load_run(d, root) for d in dirs]


def split_overrides(runs: list[Run]) -> tuple[list[str], dict]:
    """Swept keys (values differ between runs, in command-line order) and the constant ones, read from the sweep's
    points: a prerequisite stage's own overrides (the dVAE's data and model) are not swept keys."""
    runs = [r for r in runs if not r.stage] or runs
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    for run in runs:  # a key some runs override and others leave at its default: show the default (its config's)
        for key in (k for k in keys if k not in run.overrides):
            value, shown = _setting(run, key)
            if shown is not None:
                run.overrides[key], run.shown[key] = value, shown
    swept = [k for k in keys if len({r.shown.get(k) for r in runs}) > 1]
    constant = {k: runs[0].shown[k] for k in keys if k not in swept}
    return swept, constant


def choose_metric(runs: list[Run], metric: str | None) -> str:
    available = sorted({k for r in runs for k in r.last})
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if m in available), None)
        if metric is None:
            raise ReportError(
                f"none of the default metrics {list(DEFAULT_METRICS)} was logged; "
                f"pick one with --metric from: {', '.join(available) or '(no metrics at all)'}"
            )
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


@dataclass
class Paper:
    """A preset's ``paper:`` block: ``label`` (table, model, data, schedule) and ``rows``, each a ``where``
    (swept key -> value, e.g. ``{model.decoder.depth: 8}``) and the paper's top-1 per protocol, in percent
    as printed (``linear: 73.5``); held here as fractions, like ours."""

    label: str
    rows: list = field(default_factory=list)  # (where: dict, {protocol: fraction})

    @property
    def protocols(self) -> list[str]:
        return [p for p in PROTOCOLS if any(p in values for _, values in self.rows)]

    def column(self, protocol: str) -> str:
        return f"{PROTOCOLS[protocol]} top-1 (paper: {self.label})"

    def value(self, run: Run, protocol: str) -> float | None:
        return next((v[protocol] for where, v in self.rows if protocol in v and _matches(run, where)), None)


def read_paper(runs: list[Run]) -> Paper | None:
    """The ``paper:`` block the runs' preset carries (None without one); one block per sweep directory."""
    blocks = {
        json.dumps(OmegaConf.to_container(r.config.paper), sort_keys=True): r.name
        for r in runs
        if OmegaConf.select(r.config, "paper") is not None
    }
    if not blocks:
        return None
    if len(blocks) > 1:
        raise ReportError(
            f"runs {', '.join(blocks.values())} carry different paper: blocks; report each sweep directory on its own"
        )
    return parse_paper(json.loads(next(iter(blocks))), f"run {next(iter(blocks.values()))}")


def load_paper(name: str) -> Paper:
    """``--paper``: a packaged paper table (``conf/paper/<name>.yaml``) or a YAML file of the same form, for runs
    whose preset names none (or another)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(CONFIG_DIR) / "paper" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (Path(CONFIG_DIR) / "paper").glob("*.yaml"))
        raise ReportError(f"--paper {name}: no such paper table; pass one of {', '.join(known)} or a .yaml file")
    return parse_paper(OmegaConf.to_container(OmegaConf.load(path)), str(path))


def parse_paper(block, source: str) -> Paper:
    where_fix = "each paper: row needs where: {<swept key>: <value>} and top-1 values in percent, e.g. linear: 73.5"
    if not (isinstance(block, dict) and isinstance(block.get("label"), str) and isinstance(block.get("rows"), list)):
        raise ReportError(
            f"paper: block of {source} needs label: <table, model, data, epochs> and rows: [...]; {where_fix}"
        )
    paper = Paper(block["label"])
    for row in block["rows"]:
        where = row.get("where") if isinstance(row, dict) else None
        values = {k: v for k, v in row.items() if k != "where"} if isinstance(row, dict) else {}
        unknown = sorted(set(values) - set(PROTOCOLS))
        if (
            not isinstance(where, dict)
            or not where
            or unknown
            or not values
            or not all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in values.values())
        ):
            detail = f" (unknown protocols {unknown}; known: {list(PROTOCOLS)})" if unknown else ""
            raise ReportError(f"bad paper: row {row!r}{detail}; {where_fix}")
        paper.rows.append((where, {k: v / 100 for k, v in values.items()}))
    return paper


def _setting(run: Run, key: str):
    """The run's value of ``key``: its override (as typed and as written), else its composed config's."""
    if key in run.overrides:
        return run.overrides[key], run.shown[key]
    value = OmegaConf.select(run.config, key, default=None, throw_on_missing=False)
    return (None, None) if OmegaConf.is_config(value) else (value, str(value))


def _matches(run: Run, where: dict) -> bool:
    for key, want in where.items():
        value, shown = _setting(run, key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (want, value))
        if not (math.isclose(want, value) if numbers else str(want) == shown):
            return False
    return True


def metric_columns(runs: list[Run], metric: str) -> list[str]:
    """Training-log columns: the chosen metric and its best value first, then losses and the online probes."""
    available = {k for r in runs for k in r.last if k not in OFFLINE}
    probes = sorted(k for k in available if k.startswith("probe/") and not k.endswith("_loss"))
    first = [] if metric in OFFLINE else [metric, f"best {metric}"]
    wanted = [*first, "val/loss", "train/loss", *probes]
    return [c for c in dict.fromkeys(wanted) if c in available or c == f"best {metric}"]


def label(metric: str) -> str:
    """Offline protocols by name; online probes say so (a stand-in, not the protocol)."""
    if metric in OFFLINE:
        return OFFLINE[metric]
    return f"{metric} (online)" if metric.removeprefix("best ").startswith("probe/") else metric


@dataclass
class Column:
    name: str
    get: object  # Run -> value or None
    fmt: str = "{:.4f}"


def table_columns(runs: list[Run], swept: list[str], metric: str, paper: Paper | None) -> list[Column]:
    """run, swept keys, offline protocols (the chosen one first), the paper's, training logs, costs, note."""
    columns = [Column("run", lambda r: r.name)] + [Column(k, lambda r, k=k: r.shown.get(k)) for k in swept]
    offline = [m for m in OFFLINE if any(m in r.last for r in runs)]
    offline = sorted(offline, key=lambda m: m != metric)
    columns += [Column(label(m), lambda r, m=m: r.last.get(m)) for m in offline]
    if paper:
        columns += [Column(paper.column(p), lambda r, p=p: paper.value(r, p)) for p in paper.protocols]
    for c in metric_columns(runs, metric):
        get = (lambda r, c=c: r.best.get(c[5:])) if c.startswith("best ") else (lambda r, c=c: r.last.get(c))
        columns.append(Column(label(c), get))
    formats = {
        "wall_clock_s": "{:.1f}",
        "train_images_per_s": "{:.1f}",
        "gflops_per_image": "{:.3f}",
        "peak_memory_mb": "{:.0f}",
        "params": "{:.2f}",
        "encoder_params": "{:.2f}",
    }
    for key, (name, scale) in COSTS.items():
        if any(r.cost.get(key) is not None for r in runs):
            columns.append(
                Column(
                    name,
                    lambda r, k=key, s=scale: (
                        None if r.cost.get(k) is None else (r.cost[k] * s if s != 1 else r.cost[k])
                    ),
                    formats.get(key, "{}"),
                )
            )
    for key in COST_CONTEXT:
        if len({r.cost.get(key) for r in runs if r.cost}) > 1:
            columns.append(Column(key, lambda r, k=key: r.cost.get(k), "{}"))
    return columns + [Column("note", lambda r: r.note)]


def build_rows(runs: list[Run], swept: list[str], columns: list[Column]) -> list[dict]:
    runs = build_order(runs, swept)
    return [{c.name: "" if (v := c.get(r)) is None else v for c in columns} for r in runs]


def _cell(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown(rows: list[dict], columns: list[Column], caption: str) -> str:
    def cell(v, fmt):
        return _cell(v, fmt).replace("|", "\\|")

    lines = ["| " + " | ".join(c.name.replace("|", "\\|") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c.name], c.fmt) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + f"\n\n{caption}\n"


def plot(
    runs: list[Run], swept: list[str], metric: str, x: str, path: Path, title: str, paper: Paper | None = None
) -> list[str]:
    """MAE Fig. 5 style: the metric against ``x``, one line per setting of the other swept keys;
    a bar chart when ``x`` is the only, categorical, key. An untrained run is the floor: a dotted horizontal line
    on a numeric axis. The paper's numbers of the same protocol are their own series (dashed, square markers),
    labelled with the paper's table. Returns the series' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = is_numeric(runs, x)
    floors = [r for r in runs if r.floor and metric in r.last] if numeric else []
    curves = [r for r in runs if metric in r.last and not (numeric and r.floor)]
    others = [k for k in swept if k != x and len({r.shown.get(k) for r in curves}) > 1]
    done = sorted(curves, key=lambda r: ([_sort_key(r.overrides.get(k)) for k in others + [x]], r.name))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for floor in floors:
        ax.axhline(floor.last[metric], color="grey", linestyle=":", label="untrained network (floor)")
    if not others and not numeric:
        ax.bar([r.shown.get(x, "") for r in done], [r.last[metric] for r in done], label="ours")
    else:
        for setting, group in groupby(done, key=lambda r: tuple(r.shown.get(k, "") for k in others)):
            group = list(group)
            xs = [r.overrides[x] if numeric else r.shown.get(x, "") for r in group]
            name = ", ".join(f"{k}={v}" for k, v in zip(others, setting)) or "ours"
            ax.plot(xs, [r.last[metric] for r in group], marker="o", linestyle="-" if numeric else "none", label=name)
        ax.grid(alpha=0.3)
    protocol = metric[len("eval/") : -len("_top1")] if metric in OFFLINE else None
    if paper and protocol in paper.protocols:
        points = sorted(
            (
                (tuple(str(where.get(k, "")) for k in others), where[x], v[protocol])
                for where, v in paper.rows
                if x in where and protocol in v
            ),
            key=lambda p: (p[0], _sort_key(p[1])),
        )
        for setting, group in groupby(points, key=lambda p: p[0]):
            group = list(group)
            extra = ", ".join(f"{k}={v}" for k, v in zip(others, setting) if v)
            ax.plot(
                [p[1] if numeric else str(p[1]) for p in group],
                [p[2] for p in group],
                marker="s",
                linestyle="--" if numeric else "none",
                color="black",
                alpha=0.7,
                label=f"paper: {paper.label}" + (f" ({extra})" if extra else ""),
            )
    series = [line.get_label() for line in ax.get_lines()] + [c.get_label() for c in ax.containers]
    if others or floors or (paper and protocol in paper.protocols):
        ax.legend(fontsize="small")
    ax.set_xlabel(x)
    ax.set_ylabel(label(metric))
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return series


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# The page loads nothing: the policy forbids every fetch but inline styles, scripts and data: images. The script
# marks the page once every picture has decoded (a check a headless browser can read back from the DOM).
HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f3f3f3; }} td.text {{ text-align: left; }}
th.paper, td.paper {{ background: #fff6e0; }}
.panels {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.85em; text-align: center; }}
img.panel {{ image-rendering: pixelated; max-height: 32em; }}
</style></head>
<body data-images="loading">
"""
HTML_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.images = ok === imgs.length ? "decoded " + ok : "broken " + (imgs.length - ok);
});
</script>
"""


def html_page(
    title: str,
    rows: list[dict],
    columns: list[Column],
    caption: str,
    plots: list[Path],
    panels: list[tuple[str, Path]],
    paper: Paper | None,
) -> str:
    """The report as one self-contained page: table, plot, and each run's newest panel side by side (one
    tile per run, labelled by its swept setting, as MAE's Fig. 4 sets mask ratios next to each other)."""
    e = html.escape
    paper_columns = {paper.column(p) for p in paper.protocols} if paper else set()

    def cls(c: Column, value) -> str:
        kinds = (["paper"] if c.name in paper_columns else []) + (
            [] if isinstance(value, (int, float)) and not isinstance(value, bool) else ["text"]
        )
        return f' class="{" ".join(kinds)}"' if kinds else ""

    head = "".join(f"<th{' class=paper' if c.name in paper_columns else ''}>{e(c.name)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td{cls(c, row[c.name])}>{e(_cell(row[c.name], c.fmt))}</td>" for c in columns) + "</tr>\n"
        for row in rows
    )
    parts = [
        HTML_HEAD.format(title=e(title)),
        f"<h1>{e(title)}</h1>\n",
        f'<table id="results">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n',
        f'<p class="caption">{e(caption)}</p>\n',
    ]
    for plot_path in plots:
        parts.append(
            f'<h2>Plot</h2>\n<figure><img class="plot" alt="{e(plot_path.name)}" '
            f'src="{_data_uri(plot_path)}"></figure>\n'
        )
    if panels:
        parts.append('<h2>Last reconstruction / informed-mask panel per run</h2>\n<div class="panels">\n')
        for name, path in panels:
            parts.append(
                f'<figure class="tile"><img class="panel" alt="{e(path.parent.name)}/{e(path.name)}" '
                f'src="{_data_uri(path)}"><figcaption>{e(name)}<br><small>{e(path.parent.name)}/'
                f"{e(path.name)}</small></figcaption></figure>\n"
            )
        parts.append("</div>\n")
    parts.append(HTML_SCRIPT + "</body></html>\n")
    return "".join(parts)


def sweep_group(run: Path) -> str | None:
    """The W&B group ``mimzoo-train`` gave the run (``logger.wandb.group``, else its sweep directory as written
    on the command line, see :func:`mimzoo.runs.build_loggers`), recovered from ``.hydra/hydra.yaml``."""
    from mimzoo.runs import sweep_group_name

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    if OmegaConf.select(cfg, "logger.wandb.group"):
        return str(cfg.logger.wandb.group)
    hydra_yaml = OmegaConf.load(run / ".hydra" / "hydra.yaml")
    if OmegaConf.select(hydra_yaml, "hydra.mode") != "MULTIRUN":
        return None
    subdir = Path(str(OmegaConf.select(hydra_yaml, "hydra.sweep.subdir")))  # ${hydra.job.num} resolves here
    written = str(OmegaConf.to_container(hydra_yaml.hydra.sweep)["dir"])  # may hold ${now:...}: not resolved
    sweep = Path(hydra_yaml.hydra.runtime.output_dir).parents[len(subdir.parts) - 1]
    if not Path(written).is_absolute():
        sweep = Path(os.path.relpath(sweep, hydra_yaml.hydra.runtime.cwd))
    return sweep_group_name(sweep)


def log_to_wandb(
    runs: list[Run],
    root: Path,
    out: Path,
    rows: list[dict],
    columns: list[Column],
    plot_path: Path | None,
    caption: str,
) -> dict | None:
    """The table (``wandb.Table``) and plot (``wandb.Image``) in a ``report`` run of the sweep's project and
    group, in the mode the runs' logger config gives (offline unless logged in); None when that is disabled."""
    import wandb

    from mimzoo.runs import wandb_mode, wandb_settings

    first = root / runs[0].name
    wb = OmegaConf.select(runs[0].config, "logger.wandb")
    mode = wandb_mode(str(wb.mode))
    if mode == "disabled":
        return None
    group = sweep_group(first)
    run = wandb.init(
        project=wb.project,
        entity=wb.entity,
        group=group,
        name=f"report {group or root.name}",
        job_type="report",
        dir=str(out),
        mode=mode,
        settings=wandb_settings(mode),
    )
    table = wandb.Table(
        columns=[c.name for c in columns],
        data=[[None if row[c.name] == "" else row[c.name] for c in columns] for row in rows],
    )
    logged = {"report/table": table}
    if plot_path is not None:
        logged["report/plot"] = wandb.Image(str(plot_path), caption=caption)
    run.log(logged)
    where = run.dir if mode == "offline" else getattr(run, "url", None)
    run.finish()
    return {"mode": mode, "group": group, "where": where}


def report(
    root: str | Path,
    metric: str | None = None,
    x: str | None = None,
    out: str | Path | None = None,
    wandb: bool | None = None,
    paper: str | None = None,
) -> dict:
    """Write report.md, report.csv, report.html and (when something was swept) report.png; log the table and
    plot to W&B when ``wandb`` (None: when the runs logged to W&B). ``paper`` names a paper table (see
    :func:`load_paper`) instead of the runs' own. Returns paths, table and rows."""
    root = Path(root)
    runs = load_runs(root)
    swept, constant = split_overrides(runs)
    metric = choose_metric(runs, metric)
    paper = load_paper(paper) if paper else read_paper(runs)
    if x is not None and x not in swept:
        raise ReportError(f"--x {x!r} is not a swept key; swept keys: {', '.join(swept) or '(none)'}")
    if x is None:
        x = next((k for k in swept if is_numeric(runs, k)), swept[0] if swept else None)

    columns = table_columns(runs, swept, metric, paper)
    rows = build_rows(runs, swept, columns)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "html": out / "report.html"}

    fixed = ", ".join(f"`{k}={v}`" for k, v in constant.items()) or "none"
    caption = (
        f"{len(runs)} runs in `{root}`; training metrics are the last logged values, offline results "
        f"come from each run's eval/<protocol>/results.json; top-1 values are fractions (0-1). "
        f"Constant overrides: {fixed}."
    )
    if paper:
        caption += f" Paper columns: {paper.label}, as published (divided by 100), not our runs."
    context = {k: {r.cost[k] for r in runs if r.cost.get(k) is not None} for k in COST_CONTEXT}
    context = {k: v.pop() for k, v in context.items() if len(v) == 1}
    if context:
        caption += " Cost: " + ", ".join(f"{k} {v}" for k, v in context.items()) + "."
    table = markdown(rows, columns, caption)
    heading = f"{label(metric)} by {', '.join(swept) or 'run'}"
    atomic_write(paths["md"], lambda f: f.write(f"# {heading}\n\n{table}".encode()))
    with io.StringIO(newline="") as buffer:
        writer = csv.DictWriter(buffer, fieldnames=[c.name for c in columns])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
        atomic_write(paths["csv"], lambda f: f.write(text.encode()))
    series = []
    if x is not None and any(metric in r.last for r in runs):
        paths["png"] = out / "report.png"
        title = f"{label(metric)} vs {x} ({'/'.join(root.resolve().parts[-2:])})"
        series = plot(runs, swept, metric, x, paths["png"], title, paper)
    panels = [
        (", ".join(f"{k}={r.shown.get(k, '')}" for k in swept) or r.name, r.panel)
        for r in build_order(runs, swept)
        if r.panel is not None
    ]
    page = html_page(heading, rows, columns, caption, [paths["png"]] if "png" in paths else [], panels, paper)
    atomic_write(paths["html"], lambda f: f.write(page.encode()))
    logged = None
    if wandb is None:
        wandb = any(OmegaConf.select(r.config, "logger.wandb.enabled", default=False) for r in runs)
    if wandb:
        if OmegaConf.select(runs[0].config, "logger.wandb") is None:
            raise ReportError(
                f"run {runs[0].name} has no logger.wandb config to log the report with; leave out --wandb"
            )
        logged = log_to_wandb(runs, root, out, rows, columns, paths.get("png"), caption)
    return {
        "paths": paths,
        "table": table,
        "metric": metric,
        "x": x,
        "swept": swept,
        "rows": rows,
        "paper": paper,
        "series": series,
        "wandb": logged,
    }


def build_order(runs: list[Run], swept: list[str]) -> list[Run]:
    """Runs in table order: by their swept values, then by name."""
    return sorted(runs, key=lambda r: ([_sort_key(r.overrides.get(k)) for k in swept], r.name))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mimzoo-report", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/<date>/<time>")
    parser.add_argument(
        "--metric",
        help="column to report and plot: eval/<protocol>_top1 (offline) or a "
        f"metrics.csv column (default: first present of {', '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument("--x", help="swept key for the plot's x axis (default: the first numeric swept key)")
    parser.add_argument("--out", help="output folder (default: the sweep directory)")
    parser.add_argument(
        "--paper",
        help="paper table for the paper columns, instead of the runs' preset's: a name "
        "in mimzoo's conf/paper/ (e.g. mae_fig5) or a .yaml file of the same form",
    )
    parser.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the table and plot to the runs' W&B project and group (default: when the runs logged to W&B)",
    )
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir, args.metric, args.x, args.out, args.wandb, args.paper)
    except ReportError as e:
        parser.error(str(e))
    print(result["table"])
    for kind, path in result["paths"].items():
        print(f"mimzoo: report {kind:<5}{path}")
    if result["wandb"]:
        w = result["wandb"]
        print(f"mimzoo: report W&B  {w['mode']}, group {w['group']}: {w['where']}")


if __name__ == "__main__":
    main()
