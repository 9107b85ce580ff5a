"""``mimzoo-report`` on a hand-made multirun directory (known values, one failed run), and the
experiment presets composed through Hydra's compose API."""

import csv
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.image import imread, imsave
from omegaconf import OmegaConf

from conftest import TINY
from mimzoo.report import COSTS, ReportError, main, report
from mimzoo.train import CONFIG_DIR

CONF = Path(CONFIG_DIR)  # the packaged configs, src/mimzoo/conf
CONSTANT = ["data=cifar10_mini", "logger=csv"]


def make_run(
    root: Path,
    name: str,
    overrides: list[str],
    rows: list[dict] | None,
    max_epochs: int = 2,
    config: dict | None = None,
):
    """A run dir as mimzoo-train writes it: .hydra/{overrides,config}.yaml and a sparse metrics.csv."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    OmegaConf.save(
        OmegaConf.create({"trainer": {"max_epochs": max_epochs, "max_steps": -1}, **(config or {})}),
        run / ".hydra" / "config.yaml",
    )
    if rows is not None:
        columns = ["epoch", "step", "lr-AdamW", "probe/knn_top1", "train/loss", "val/loss"]
        with (run / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def curve(knn: list[float], val: list[float], train: list[float]) -> list[dict]:
    """CSVLogger-like rows: lr and train loss on their own rows, validation metrics at epoch end."""
    rows = []
    for epoch, (k, v, t) in enumerate(zip(knn, val, train)):
        rows += [
            {"step": 10 * epoch, "lr-AdamW": 1e-3},
            {"epoch": epoch, "step": 10 * epoch + 9, "train/loss": t},
            {"epoch": epoch, "step": 10 * epoch + 9, "probe/knn_top1": k, "val/loss": v},
        ]
    return rows


@pytest.fixture
def sweep(tmp_path):
    """Four points of mask.ratio x decoder.depth, dirs numbered out of order; run 3 failed."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    make_run(
        root, "0", CONSTANT + ["mask.ratio=0.75", "model.decoder.depth=2"], curve([0.30, 0.40], [1.0, 0.8], [1.1, 0.9])
    )
    make_run(
        root, "1", CONSTANT + ["mask.ratio=0.25", "model.decoder.depth=2"], curve([0.50, 0.45], [0.7, 0.6], [0.8, 0.7])
    )
    make_run(
        root, "2", CONSTANT + ["mask.ratio=0.75", "model.decoder.depth=1"], curve([0.35, 0.38], [1.2, 1.1], [1.3, 1.2])
    )
    make_run(root, "3", CONSTANT + ["mask.ratio=0.5", "model.decoder.depth=1"], None)
    return root


def test_table_values_sorting_and_swept_keys(sweep, tmp_path):
    result = report(sweep, out=tmp_path / "out")
    assert result["metric"] == "probe/knn_top1" and result["x"] == "mask.ratio"
    assert result["swept"] == ["mask.ratio", "model.decoder.depth"]
    rows = result["rows"]
    assert [(r["mask.ratio"], r["model.decoder.depth"]) for r in rows] == [
        ("0.25", "2"),
        ("0.5", "1"),
        ("0.75", "1"),
        ("0.75", "2"),
    ]
    assert [r["run"] for r in rows] == ["1", "3", "2", "0"]
    by_run = {r["run"]: r for r in rows}
    assert by_run["1"]["probe/knn_top1 (online)"] == 0.45 and by_run["1"]["best probe/knn_top1 (online)"] == 0.50
    assert by_run["0"]["val/loss"] == 0.8 and by_run["0"]["train/loss"] == 0.9
    assert by_run["3"]["probe/knn_top1 (online)"] == "" and "no metrics.csv" in by_run["3"]["note"]
    assert all(by_run[r]["note"] == "" for r in "012")
    table = result["table"]
    assert table.splitlines()[0] == (
        "| run | mask.ratio | model.decoder.depth | probe/knn_top1 (online) | best "
        "probe/knn_top1 (online) | val/loss | train/loss | note |"
    )
    assert "| 1 | 0.25 | 2 | 0.4500 | 0.5000 | 0.6000 | 0.7000 |  |" in table
    assert "Constant overrides: `data=cifar10_mini`, `logger=csv`" in table  # in the caption, not columns
    assert (tmp_path / "out" / "report.md").read_text().endswith(table)


def test_csv_and_png(sweep):
    paths = report(sweep)["paths"]
    assert paths["md"].parent == sweep  # default output: the sweep directory
    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["1", "3", "2", "0"]
    assert float(rows[0]["probe/knn_top1 (online)"]) == 0.45 and rows[1]["probe/knn_top1 (online)"] == ""
    image = imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_metric_and_x_choice(sweep, tmp_path):
    result = report(sweep, metric="val/loss", x="model.decoder.depth", out=tmp_path)
    assert result["rows"][0]["run"] == "1" and list(result["rows"][0])[3] == "val/loss"
    assert result["rows"][0]["best val/loss"] == 0.6  # losses: best is the minimum
    assert imread(result["paths"]["png"]).ndim == 3


def test_default_metric_falls_back(tmp_path):
    rows = [{"epoch": 0, "step": 9, "val/loss": 0.5}]
    make_run(tmp_path, "0", ["mask=random"], rows, max_epochs=1)
    make_run(tmp_path, "1", ["mask=block"], rows, max_epochs=1)
    result = report(tmp_path)
    assert result["metric"] == "val/loss"
    assert result["x"] == "mask"  # single categorical key: bar chart
    assert [r["mask"] for r in result["rows"]] == ["block", "random"]
    assert imread(result["paths"]["png"]).ndim == 3


def test_unfinished_and_empty_runs_are_flagged(tmp_path):
    make_run(tmp_path, "0", ["mask.ratio=0.5"], curve([0.3], [1.0], [1.0]), max_epochs=10)
    make_run(tmp_path, "1", ["mask.ratio=0.75"], curve([0.3], [1.0], [1.0]), max_epochs=1)
    make_run(tmp_path, "2", ["mask.ratio=0.9"], [])  # header only: crashed before logging
    notes = {r["run"]: r["note"] for r in report(tmp_path)["rows"]}
    assert notes == {"0": "stopped at epoch 1 of 10", "1": "", "2": "no metrics logged"}


def test_errors(sweep, tmp_path):
    with pytest.raises(ReportError, match="no such directory"):
        report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no runs found"):
        report(tmp_path / "empty")
    with pytest.raises(
        ReportError,
        match=r"unknown metric .probe/linear_top1.; available: lr-AdamW, probe/knn_top1, train/loss, val/loss$",
    ):
        report(sweep, metric="probe/linear_top1")
    with pytest.raises(ReportError, match="not a swept key; swept keys: mask.ratio, model.decoder.depth"):
        report(sweep, x="data")


def test_cli(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "| 0.25 | 2 | 0.4500 |" in out and str(tmp_path / "cli" / "report.png") in out
    assert str(tmp_path / "cli" / "report.html") in out and "W&B" not in out  # these runs did not log to W&B
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--metric", "nope"])
    assert exit_info.value.code == 2 and "unknown metric 'nope'" in capsys.readouterr().err


SWEEPS = {  # preset: (swept key, its values, where the value lands in the config)
    "mae_mask_ratio": ("mask.ratio", [0.1, 0.25, 0.5, 0.75, 0.9], "mask.ratio"),
    "mae_decoder_depth": ("model.decoder.depth", [1, 2, 4, 8], "model.decoder.depth"),
    "mae_mask_type": ("mask", ["random", "block", "grid"], "mask.name"),
}


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", list(SWEEPS))
def test_ablation_presets_compose(name):
    cfg = compose_train(f"experiment={name}")
    key, values, path = SWEEPS[name]
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert next(iter(params)) == key
    # What BasicSweeper launches: the product of the params, each job one override list.
    parser = OverridesParser.create()
    batch = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)[0]
    assert [parser.parse_override(job[0]).value() for job in batch] == values
    # The small-scale protocol every preset shares (experiment=mae_cifar: ViT-T, patch 4, decoder 256x4).
    assert (cfg.model.encoder.embed_dim, cfg.model.encoder.depth, cfg.model.encoder.patch_size) == (192, 12, 4)
    assert (cfg.model.decoder.dim, cfg.model.decoder.depth, cfg.model.decoder.num_heads) == (256, 4, 8)
    assert cfg.objective == "probe/knn_top1" and cfg.data.name == "cifar10" and cfg.mask.ratio == 0.75
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{name}/")
    for job, value in zip(batch, values):  # every point composes, and its value lands in the config
        assert OmegaConf.select(compose_train(f"experiment={name}", *job), path) == value


def test_mask_type_keeps_ratio_for_every_mask():
    assert compose_train("experiment=mae_mask_type", "mask=block").mask.ratio == 0.75
    assert compose_train("experiment=mae_mask_type", "mask=block", "mask.ratio=0.5").mask.ratio == 0.5


def test_demo_preset_is_short():
    """Its timing (~3.5 min on 2 CPU cores) rests on these: a few hundred steps, a bounded kNN."""
    cfg = compose_train("experiment=demo")
    OmegaConf.resolve(cfg)
    assert cfg.data.name == "cifar10" and cfg.trainer.max_epochs * cfg.trainer.limit_train_batches <= 300
    assert cfg.probe.knn.enabled and cfg.probe.knn.max_bank <= 5000 and cfg.trainer.limit_val_batches <= 16
    assert cfg.model.encoder.depth == 4 and cfg.hydra.run.dir.startswith("runs/demo/")


def test_knn_queries_follow_limit_val_batches(monkeypatch):
    """The demo bounds the online kNN's test queries with trainer.limit_val_batches."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from mimzoo.eval import online

    data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    dm = SimpleNamespace(
        num_classes=2,
        bank_dataloader=lambda: DataLoader(data, batch_size=4),
        val_dataloader=lambda: DataLoader(data, batch_size=4),
    )
    module = SimpleNamespace(
        training=False,
        device=torch.device("cpu"),
        features=lambda x: x,
        eval=lambda: None,
        train=lambda mode: None,
        log=lambda *a, **k: None,
    )
    seen = []
    monkeypatch.setattr(
        online,
        "knn_predict",
        lambda bank, by, queries, c, *a: seen.append(len(queries)) or torch.zeros(len(queries), c),
    )
    for limit, queries in ((3, 12), (10, 40)):  # 10 = all batches: no limit
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, datamodule=dm, num_val_batches=[limit])
        online.OnlineKNN(k=2).on_validation_epoch_end(trainer, module)
        assert seen[-1] == queries


# --- offline protocols, paper numbers, costs, the HTML page, W&B ---------------------------------------------
def paper_block(preset: str) -> dict:
    """The ``paper:`` block of a real preset, as mimzoo-train saves it into each run's .hydra/config.yaml."""
    return OmegaConf.to_container(compose_train(f"experiment={preset}").paper)


def cost(**changes) -> dict:
    """A cost.json as the training callback writes it (the contract's keys and types)."""
    base = {
        "wall_clock_s": 120.0,
        "train_images_per_s": 850.5,
        "gflops_per_image": 1.25,
        "peak_memory_mb": 2048.0,
        "memory_kind": "cpu_max_rss",
        "params": 5_500_000,
        "encoder_params": 5_000_000,
        "epochs": 2,
        "steps": 20,
        "images_seen": 1280,
        "device": "cpu",
        "precision": "bf16-mixed",
    }
    return {**base, **changes}


def test_paper_and_cost_columns(tmp_path):
    import json

    paper = {"paper": paper_block("mae_decoder_depth")}
    for name, depth in (("0", 4), ("1", 1), ("2", 2)):
        make_run(
            tmp_path, name, [f"model.decoder.depth={depth}"], curve([0.3], [1.0], [1.0]), max_epochs=1, config=paper
        )
    (tmp_path / "1" / "cost.json").write_text(json.dumps(cost()))
    (tmp_path / "2" / "cost.json").write_text(json.dumps(cost(wall_clock_s=60.0, gflops_per_image=None)))
    result = report(tmp_path)
    lin, ft = (f"{p} top-1 (paper: MAE Table 1a, ViT-L/16, IN-1K, 800 ep)" for p in ("linear", "fine-tune"))
    rows = {r["model.decoder.depth"]: r for r in result["rows"]}
    assert [rows[d][lin] for d in "124"] == pytest.approx([0.655, 0.700, 0.719])
    assert [rows[d][ft] for d in "124"] == pytest.approx([0.848, 0.849, 0.849])
    header = result["table"].splitlines()[0]
    assert header.index(lin) < header.index("probe/knn_top1 (online)")  # the paper's columns before the online probes
    assert rows["1"]["wall-clock (min)"] == 2.0 and rows["2"]["wall-clock (min)"] == 1.0
    assert rows["1"]["params (M)"] == pytest.approx(5.5) and rows["1"]["encoder params (M)"] == pytest.approx(5.0)
    assert (rows["1"]["img/s"], rows["1"]["peak memory (MB)"], rows["1"]["epochs"], rows["1"]["images seen"]) == (
        850.5,
        2048.0,
        2,
        1280,
    )
    assert rows["1"]["GFLOPs/img (train step)"] == 1.25 and rows["2"]["GFLOPs/img (train step)"] == ""  # compiled
    assert rows["4"]["wall-clock (min)"] == ""  # no cost.json (yet): the cell stays empty
    assert "| 1 | 1 | 0.6550 | 0.8480 |" in result["table"]
    assert "| 2.0 | 850.5 | 1.250 | 2048 | 5.50 |" in result["table"]
    assert "Paper columns: MAE Table 1a, ViT-L/16, IN-1K, 800 ep, as published" in result["table"]
    assert "Cost: memory_kind cpu_max_rss, device cpu, precision bf16-mixed." in result["table"]
    assert "device" not in header.split(" | ")
    (tmp_path / "2" / "cost.json").write_text(json.dumps(cost(device="cuda:0")))  # runs disagree: a column
    assert [r["device"] for r in report(tmp_path)["rows"]] == ["cpu", "cuda:0", ""]


def test_paper_rows_match_overrides_and_config(tmp_path):
    """Table 1f: a row names (mask, ratio); a run that did not override the ratio matches by its config."""
    config = {"paper": paper_block("mae_mask_type"), "mask": {"name": "block", "ratio": 0.75}}
    make_run(tmp_path, "0", ["mask=block"], [], config=config)
    make_run(tmp_path, "1", ["mask=block", "mask.ratio=0.5"], [], config=config)
    make_run(tmp_path, "2", ["mask=random"], [], config=config)
    make_run(tmp_path, "3", ["mask=center"], [], config=config)  # not in the paper: empty cell
    make_run(tmp_path, "4", ["mask=grid"], curve([0.3], [1.0], [1.0]), max_epochs=1, config=config)
    lin = "linear top-1 (paper: MAE Table 1f, ViT-L/16, IN-1K, 800 ep)"
    rows = {r["run"]: r[lin] for r in report(tmp_path)["rows"]}
    assert rows == {
        "0": pytest.approx(0.639),
        "1": pytest.approx(0.723),
        "2": pytest.approx(0.735),
        "3": "",
        "4": pytest.approx(0.66),
    }


def test_a_key_left_at_its_default_shows_the_default(tmp_path):
    """A second seed added to a sweep by one override: the runs without it show their config's seed, 0."""
    make_run(tmp_path, "0", ["mask.ratio=0.75"], curve([0.3], [1.0], [1.0]), max_epochs=1, config={"seed": 0})
    make_run(tmp_path, "1", ["mask.ratio=0.75", "seed=1"], curve([0.4], [1.0], [1.0]), max_epochs=1, config={"seed": 1})
    assert {r["run"]: r["seed"] for r in report(tmp_path)["rows"]} == {"0": "0", "1": "1"}


def test_paper_table_given_on_the_command_line(tmp_path, capsys):
    """--paper names a packaged table (or a .yaml file) for runs whose preset carries none; a bad name lists them."""
    make_run(tmp_path, "0", ["mask.ratio=0.75"], curve([0.3], [1.0], [1.0]), max_epochs=1)
    make_run(tmp_path, "1", ["mask.ratio=0.25"], curve([0.4], [1.0], [1.0]), max_epochs=1)
    lin = "linear top-1 (paper: MAE Fig. 5, ViT-L/16, IN-1K, 800 ep (two points stated in the text))"
    rows = {r["run"]: r[lin] for r in report(tmp_path, paper="mae_fig5")["rows"]}
    assert rows == {"0": pytest.approx(0.735), "1": ""}
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--paper", "no_such_table"])
    assert "mae_fig5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "block,message",
    [
        ({"rows": []}, "needs label:"),
        ({"label": "T", "rows": [{"linear": 70.0}]}, "each paper: row needs where:"),
        ({"label": "T", "rows": [{"where": {"mask.ratio": 0.75}, "lin": 70.0}]}, r"unknown protocols \['lin'\]"),
        ({"label": "T", "rows": [{"where": {"mask.ratio": 0.75}, "linear": 735}]}, "in percent"),
    ],
)
def test_bad_paper_block(tmp_path, block, message):
    make_run(tmp_path, "0", ["mask.ratio=0.75"], curve([0.3], [1.0], [1.0]), max_epochs=1, config={"paper": block})
    with pytest.raises(ReportError, match=message):
        report(tmp_path)


def test_unreadable_result_file(tmp_path):
    make_run(tmp_path, "0", ["mask.ratio=0.75"], curve([0.3], [1.0], [1.0]), max_epochs=1)
    (tmp_path / "0" / "cost.json").write_text('{"wall_clock_s": ')  # cut short
    with pytest.raises(ReportError, match=r"0/cost.json is not valid JSON .*; delete it and re-run what wrote it"):
        report(tmp_path)


CHROMIUM = shutil.which("chromium")


class DomTable(HTMLParser):
    """The parts of a rendered report page the tests read: header and body cells, tags seen, <body>'s
    attributes, images (their src) and figure captions."""

    def __init__(self):
        super().__init__()
        self.header, self.rows, self.tags, self.images, self.captions, self.paragraphs = [], [], [], [], [], []
        self.body = {}
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td", "figcaption", "p"):
            self._cell = (tag, [])

    def handle_endtag(self, tag):
        if self._cell and tag == self._cell[0]:
            text = "".join(self._cell[1])
            {
                "th": self.header,
                "td": self.rows[-1] if self.rows else [],
                "figcaption": self.captions,
                "p": self.paragraphs,
            }[tag].append(text)
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self._cell[1].append(data)


# Appended to a copy of the page, after its own script: where each panel tile landed on the page.
LAYOUT_PROBE = """<script>window.addEventListener("load", function () {
  document.body.dataset.tiles = Array.prototype.map.call(document.querySelectorAll("figure.tile"),
    function (t) { return t.offsetTop + ":" + t.offsetLeft; }).join(" ");
});</script>"""


def render(page: Path, tmp_path: Path) -> DomTable:
    """The page as headless Chromium rendered it (scripts run, images decoded), read back from --dump-dom."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; CI installs it)")
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1600,1200",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "<table" in proc.stdout, proc.stderr[-2000:]
    dom = DomTable()
    dom.feed(proc.stdout)
    return dom


def picture(path: Path, value: float) -> bytes:
    """A small panel-like PNG (flat grey ``value``), returned as its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, np.full((24, 60, 3), value))
    return path.read_bytes()


def test_html_page_in_headless_chromium(tmp_path):
    import base64
    import json

    root = tmp_path / "sweep"
    paper = {"paper": paper_block("mae_mask_ratio")}
    for name, ratio in (("0", 0.75), ("1", 0.1), ("2", 0.5)):
        make_run(
            root,
            name,
            [f"mask.ratio={ratio}", "tag='<i>a&b</i>'"],
            curve([0.3, 0.4], [1.0, 0.9], [1.0, 0.9]),
            config=paper,
        )
    picture(root / "0" / "reconstructions" / "epoch_0000.png", 0.1)
    newest = picture(root / "0" / "reconstructions" / "epoch_0001.png", 0.2)  # the newest is shown
    informed = picture(root / "1" / "informed_masks" / "epoch_0001.png", 0.3)  # SG-MAE's panel wins
    picture(root / "1" / "reconstructions" / "epoch_0001.png", 0.4)
    (root / "0" / "cost.json").write_text(json.dumps(cost()))
    result = report(root, out=tmp_path / "out")
    page = result["paths"]["html"]
    assert "http" not in page.read_text().replace("http-equiv", "")  # nothing fetched from the network
    dom = render(page, tmp_path)
    paper_lin = "linear top-1 (paper: MAE Fig. 5, ViT-L/16, IN-1K, 800 ep (two points stated in the text))"
    assert dom.header == [
        "run",
        "mask.ratio",
        paper_lin,
        "probe/knn_top1 (online)",
        "best probe/knn_top1 (online)",
        "val/loss",
        "train/loss",
        *[name for name, _ in COSTS.values()],
        "note",
    ]
    body = [dict(zip(dom.header, row)) for row in dom.rows if row]
    assert [(r["run"], r["mask.ratio"], r[paper_lin]) for r in body] == [
        ("1", "0.1", "0.5460"),
        ("2", "0.5", ""),
        ("0", "0.75", "0.7350"),
    ]
    assert body[2]["wall-clock (min)"] == "2.0" and body[2]["params (M)"] == "5.50" and body[0]["img/s"] == ""
    # The override value '<i>a&b</i>' is text on the page (in the caption), not markup.
    assert "i" not in dom.tags and "`tag='<i>a&b</i>'`" in dom.paragraphs[0]
    assert dom.body["data-images"] == "decoded 3"  # the plot and both panels decoded (naturalWidth > 0)
    plot_src, *panel_srcs = [img["src"] for img in dom.images]
    assert plot_src == "data:image/png;base64," + base64.b64encode(result["paths"]["png"].read_bytes()).decode()
    assert [base64.b64decode(src.split(",", 1)[1]) for src in panel_srcs] == [informed, newest]  # table order
    assert dom.captions == [
        "mask.ratio=0.1informed_masks/epoch_0001.png",
        "mask.ratio=0.75reconstructions/epoch_0001.png",
    ]
    tops, lefts = zip(*(tuple(map(int, t.split(":"))) for t in dom.body["data-tiles"].split()))
    assert len(set(tops)) == 1 and lefts[0] < lefts[1]  # side by side, one tile per run


def test_broken_image_is_reported_by_the_page(tmp_path):
    """The page's own check (data-images) sees an image that does not decode."""
    make_run(tmp_path / "s", "0", ["mask.ratio=0.5"], curve([0.3], [1.0], [1.0]), max_epochs=1)
    make_run(tmp_path / "s", "1", ["mask.ratio=0.75"], curve([0.4], [1.0], [1.0]), max_epochs=1)
    page = report(tmp_path / "s")["paths"]["html"]
    text = page.read_text()
    page.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    assert render(page, tmp_path).body["data-images"] == "broken 1"


@pytest.fixture(scope="module")
def evaluated_sweep(tmp_path_factory, cli):
    """A real tiny sweep of experiment=mae_decoder_depth (decoder depth 1, 2; W&B offline), each point evaluated
    with the real mimzoo-eval into <run>/eval/<protocol>: kNN on both, linear on depth 1 only."""
    import os

    sweep = tmp_path_factory.mktemp("e2e") / "multirun" / "depth"
    tiny = [o for o in TINY if not o.startswith("model.decoder.depth")]
    env_mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        cli(
            "train",
            "-m",
            "experiment=mae_decoder_depth",
            *tiny,
            "model.decoder.depth=1,2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "probe.linear.enabled=false",
            f"hydra.sweep.dir={sweep}",
        )
    finally:
        os.environ["WANDB_MODE"] = env_mode or "disabled"
    runs = {OmegaConf.load(d / ".hydra" / "config.yaml").model.decoder.depth: d for d in (sweep / "0", sweep / "1")}
    common = ["data=cifar10_mini", "data.num_workers=0", "logger=csv", "trainer.enable_progress_bar=false"]
    for run in runs.values():
        cli(
            "evaluate",
            "protocol=knn",
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            *common,
            f"hydra.run.dir={run / 'eval' / 'knn'}",
        )
    cli(
        "evaluate",
        "protocol=linear",
        f"ckpt={runs[1] / 'checkpoints' / 'last.ckpt'}",
        *common,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "protocol.warmup_epochs=0",
        f"hydra.run.dir={runs[1] / 'eval' / 'linear'}",
    )
    return sweep, runs


@pytest.mark.slow
def test_sweep_evaluated_reported_rendered_and_logged(evaluated_sweep, tmp_path):
    import json
    import os

    sweep, runs = evaluated_sweep
    os.environ["WANDB_MODE"], mode = "offline", os.environ.get("WANDB_MODE")
    try:
        result = report(sweep, out=tmp_path / "out")  # the runs logged to W&B: so does the report, by default
    finally:
        os.environ["WANDB_MODE"] = mode or "disabled"
    top1 = {
        (d, p): json.loads((run / "eval" / p / "results.json").read_text())["top1"]
        for d, run in runs.items()
        for p in ("knn", "linear")
        if (run / "eval" / p).exists()
    }
    assert result["metric"] == "eval/linear_top1"  # an offline result is the default metric
    rows = {r["model.decoder.depth"]: r for r in result["rows"]}
    assert sorted(rows) == ["1", "2"]  # the evaluations' own Hydra dirs are not points of the sweep
    assert rows["1"]["linear top-1 (offline)"] == top1[1, "linear"] and rows["2"]["linear top-1 (offline)"] == ""
    assert [rows[d]["kNN top-1 (offline)"] for d in "12"] == [top1[1, "knn"], top1[2, "knn"]]
    paper = "linear top-1 (paper: MAE Table 1a, ViT-L/16, IN-1K, 800 ep)"
    assert [rows[d][paper] for d in "12"] == pytest.approx([0.655, 0.700])
    header = result["table"].splitlines()[0].split(" | ")
    assert header[2:5] == ["linear top-1 (offline)", "kNN top-1 (offline)", paper]
    assert "probe/knn_top1 (online)" in header
    assert result["series"] == ["ours", "paper: MAE Table 1a, ViT-L/16, IN-1K, 800 ep"]
    costs = {d: json.loads((run / "cost.json").read_text()) for d, run in runs.items()}  # written by training
    for d in "12":
        assert rows[d]["wall-clock (min)"] == pytest.approx(costs[int(d)]["wall_clock_s"] / 60)
        assert rows[d]["epochs"] == 1
        assert rows[d]["GFLOPs/img (train step)"] == costs[int(d)]["gflops_per_image"] > 0
        assert rows[d]["images seen"] == 128 and rows[d]["params (M)"] == pytest.approx(costs[int(d)]["params"] / 1e6)
    # The page, rendered: the table's offline columns and both runs' panels, decoded.
    dom = render(result["paths"]["html"], tmp_path)
    assert dom.header[:5] == ["run", "model.decoder.depth", "linear top-1 (offline)", "kNN top-1 (offline)", paper]
    assert [row[2] for row in dom.rows if row] == [f"{top1[1, 'linear']:.4f}", ""]
    assert dom.body["data-images"] == "decoded 3" and dom.captions == [
        "model.decoder.depth=1reconstructions/epoch_0000.png",
        "model.decoder.depth=2reconstructions/epoch_0000.png",
    ]
    # W&B: the report's offline run sits in the runs' group and holds the same table and the plot.
    logged = result["wandb"]
    assert logged["mode"] == "offline" and logged["group"] == str(sweep).replace("/", "_")
    wandb_run = Path(logged["where"]).parent
    for run in runs.values():
        assert logged["group"].encode() in next(run.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert logged["group"].encode() in next(wandb_run.glob("run-*.wandb")).read_bytes()
    table = json.loads(next(wandb_run.glob("files/media/table/report/table_*.table.json")).read_text())
    assert table["columns"] == [c.strip("| ") for c in header]
    assert [row[:4] for row in table["data"]] == [
        [runs[1].name, "1", top1[1, "linear"], top1[1, "knn"]],
        [runs[2].name, "2", None, top1[2, "knn"]],
    ]
    plot = next(wandb_run.glob("files/media/images/report/plot_*.png"))
    assert imread(plot).shape == imread(result["paths"]["png"]).shape


@pytest.mark.parametrize(
    "group,mode,expected",
    [
        (None, "MULTIRUN", "multirun_mae_mask_ratio_2025-01-01_12-00-00"),  # the sweep dir as written, relative
        ("mine", "MULTIRUN", "mine"),  # logger.wandb.group wins
        (None, "RUN", None),  # a single run has no group
    ],
)
def test_sweep_group_as_training_named_it(tmp_path, group, mode, expected):
    """The group build_loggers gave a run whose sweep dir was relative and held ${now:...} (not resolvable later)."""
    from mimzoo.report import sweep_group

    cwd = tmp_path / "launch"
    run = cwd / "multirun" / "mae_mask_ratio" / "2025-01-01_12-00-00" / "3"
    make_run(run.parent, run.name, ["mask.ratio=0.5"], None, config={"logger": {"wandb": {"group": group}}})
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "mode": mode,
                    "job": {"num": 3},
                    "runtime": {"output_dir": str(run), "cwd": str(cwd)},
                    "sweep": {
                        "dir": "multirun/${hydra.runtime.choices.experiment}/${now:%Y-%m-%d}_${now:%H-%M-%S}",
                        "subdir": "${hydra.job.num}",
                    },
                }
            }
        ),
        run / ".hydra" / "hydra.yaml",
    )
    assert sweep_group(run) == expected


def test_wandb_off_when_disabled_or_unconfigured(tmp_path):
    wb = {"logger": {"wandb": {"enabled": True, "mode": "disabled", "project": "p", "entity": None, "group": None}}}
    make_run(tmp_path / "a", "0", ["mask.ratio=0.5"], curve([0.3], [1.0], [1.0]), max_epochs=1, config=wb)
    make_run(tmp_path / "a", "1", ["mask.ratio=0.75"], curve([0.4], [1.0], [1.0]), max_epochs=1, config=wb)
    assert report(tmp_path / "a")["wandb"] is None and not (tmp_path / "a" / "wandb").exists()
    make_run(tmp_path / "b", "0", ["mask.ratio=0.5"], curve([0.3], [1.0], [1.0]), max_epochs=1)
    with pytest.raises(ReportError, match="no logger.wandb config to log the report with; leave out --wandb"):
        report(tmp_path / "b", wandb=True)


@pytest.mark.parametrize(
    "preset,label,rows",
    [
        ("mae_decoder_depth", "MAE Table 1a, ViT-L/16, IN-1K, 800 ep", 5),
        ("mae_mask_type", "MAE Table 1f, ViT-L/16, IN-1K, 800 ep", 4),
        ("mae_mask_ratio", "MAE Fig. 5, ViT-L/16, IN-1K, 800 ep (two points stated in the text)", 2),
        ("mae_mask_ratio_cpu", "MAE Fig. 5, ViT-L/16, IN-1K, 800 ep (two points stated in the text)", 2),
        ("compare_cifar", "IN-1K headlines, ViT-B size, 400-1600 ep", 4),
    ],
)
def test_presets_carry_their_paper_table(preset, label, rows):
    """The presets that reproduce a paper table bring its numbers (conf/paper/), in a form the report reads."""
    from mimzoo.report import Run, read_paper

    paper = read_paper([Run("0", config=compose_train(f"experiment={preset}"))])
    assert paper.label == label and len(paper.rows) == rows
    assert set(paper.protocols) <= {"linear", "finetune", "knn"}


def test_untrained_floor_is_a_line_on_the_plot(tmp_path):
    """The untrained network (trainer.max_steps=0: no metrics.csv, steps 0 and a last.ckpt) is the floor of a
    numeric sweep: a horizontal line, not a point, and its `compare` override does not split the curve in two."""
    import json

    def evaluated(name, overrides, top1, rows):
        make_run(tmp_path, name, overrides, rows, max_epochs=1)
        (tmp_path / name / "eval" / "knn").mkdir(parents=True)
        (tmp_path / name / "eval" / "knn" / "results.json").write_text(json.dumps({"top1": top1}))

    for name, ratio, top1 in (("0", 0.5, 0.41), ("1", 0.75, 0.44)):
        evaluated(name, ["compare=mae", f"mask.ratio={ratio}"], top1, curve([0.3], [1.0], [1.0]))
    evaluated("floor", ["compare=untrained", "mask.ratio=0.75"], 0.31, None)
    (tmp_path / "floor" / "cost.json").write_text(json.dumps(cost(steps=0, images_seen=0)))
    (tmp_path / "floor" / "checkpoints").mkdir()
    (tmp_path / "floor" / "checkpoints" / "last.ckpt").touch()
    result = report(tmp_path, metric="eval/knn_top1")
    assert result["x"] == "mask.ratio" and result["swept"] == ["compare", "mask.ratio"]
    assert result["series"] == ["untrained network (floor)", "ours"]
    assert "| floor | untrained | 0.75 |" in result["table"] and "untrained (trainer.max_steps=0)" in result["table"]


def test_a_method_this_environment_cannot_import_is_still_reported(tmp_path):
    """The report reads files: a run of a user's own method (its module not on the path here) is a point of the
    sweep, while a run of a method without features (the dVAE) is a prerequisite stage."""
    for name, target in (("0", "my_lab.methods.MyMIM"), ("1", "mimzoo.methods.dvae.DVAE")):
        make_run(
            tmp_path,
            name,
            CONSTANT + [f"model={name}"],
            curve([0.3], [1.0], [1.0]),
            max_epochs=1,
            config={"model": {"_target_": target}},
        )
    notes = {row["run"]: row["note"] for row in report(tmp_path, metric="val/loss")["rows"]}
    assert notes == {"0": "", "1": "prerequisite stage (no encoder to evaluate)"}
