"""``mimzoo-report`` on a hand-made multirun directory (known values, one failed run), and the
experiment presets composed through Hydra's compose API."""

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.image import imread
from omegaconf import OmegaConf

from mimzoo.report import ReportError, main, report
from mimzoo.train import CONFIG_DIR

CONF = Path(CONFIG_DIR)  # the packaged configs, src/mimzoo/conf
CONSTANT = ["data=cifar10_mini", "logger=csv"]


def make_run(root: Path, name: str, overrides: list[str], rows: list[dict] | None, max_epochs: int = 2):
    """A run dir as mimzoo-train writes it: .hydra/{overrides,config}.yaml and a sparse metrics.csv."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"trainer": {"max_epochs": max_epochs, "max_steps": -1}}),
                   run / ".hydra" / "config.yaml")
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
        rows += [{"step": 10 * epoch, "lr-AdamW": 1e-3},
                 {"epoch": epoch, "step": 10 * epoch + 9, "train/loss": t},
                 {"epoch": epoch, "step": 10 * epoch + 9, "probe/knn_top1": k, "val/loss": v}]
    return rows


@pytest.fixture
def sweep(tmp_path):
    """Four points of mask.ratio x decoder.depth, dirs numbered out of order; run 3 failed."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    make_run(root, "0", CONSTANT + ["mask.ratio=0.75", "model.decoder.depth=2"], curve([0.30, 0.40], [1.0, 0.8], [1.1, 0.9]))
    make_run(root, "1", CONSTANT + ["mask.ratio=0.25", "model.decoder.depth=2"], curve([0.50, 0.45], [0.7, 0.6], [0.8, 0.7]))
    make_run(root, "2", CONSTANT + ["mask.ratio=0.75", "model.decoder.depth=1"], curve([0.35, 0.38], [1.2, 1.1], [1.3, 1.2]))
    make_run(root, "3", CONSTANT + ["mask.ratio=0.5", "model.decoder.depth=1"], None)
    return root


def test_table_values_sorting_and_swept_keys(sweep, tmp_path):
    result = report(sweep, out=tmp_path / "out")
    assert result["metric"] == "probe/knn_top1" and result["x"] == "mask.ratio"
    assert result["swept"] == ["mask.ratio", "model.decoder.depth"]
    rows = result["rows"]
    assert [(r["mask.ratio"], r["model.decoder.depth"]) for r in rows] == [("0.25", "2"), ("0.5", "1"), ("0.75", "1"), ("0.75", "2")]
    assert [r["run"] for r in rows] == ["1", "3", "2", "0"]
    by_run = {r["run"]: r for r in rows}
    assert by_run["1"]["probe/knn_top1"] == 0.45 and by_run["1"]["best probe/knn_top1"] == 0.50
    assert by_run["0"]["val/loss"] == 0.8 and by_run["0"]["train/loss"] == 0.9
    assert by_run["3"]["probe/knn_top1"] == "" and "no metrics.csv" in by_run["3"]["note"]
    assert all(by_run[r]["note"] == "" for r in "012")
    table = result["table"]
    assert table.splitlines()[0] == ("| run | mask.ratio | model.decoder.depth | probe/knn_top1 | best probe/knn_top1"
                                     " | val/loss | train/loss | note |")
    assert "| 1 | 0.25 | 2 | 0.4500 | 0.5000 | 0.6000 | 0.7000 |  |" in table
    assert "Constant overrides: `data=cifar10_mini`, `logger=csv`" in table  # in the caption, not columns
    assert (tmp_path / "out" / "report.md").read_text().endswith(table)


def test_csv_and_png(sweep):
    paths = report(sweep)["paths"]
    assert paths["md"].parent == sweep  # default output: the sweep directory
    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["1", "3", "2", "0"]
    assert float(rows[0]["probe/knn_top1"]) == 0.45 and rows[1]["probe/knn_top1"] == ""
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
    with pytest.raises(ReportError, match=r"unknown metric .probe/linear_top1.; available: lr-AdamW, probe/knn_top1, train/loss, val/loss$"):
        report(sweep, metric="probe/linear_top1")
    with pytest.raises(ReportError, match="not a swept key; swept keys: mask.ratio, model.decoder.depth"):
        report(sweep, x="data")


def test_cli(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "| 0.25 | 2 | 0.4500 |" in out and str(tmp_path / "cli" / "report.png") in out
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
    dm = SimpleNamespace(num_classes=2, bank_dataloader=lambda: DataLoader(data, batch_size=4),
                         val_dataloader=lambda: DataLoader(data, batch_size=4))
    module = SimpleNamespace(training=False, device=torch.device("cpu"), features=lambda x: x,
                             eval=lambda: None, train=lambda mode: None, log=lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(online, "knn_predict", lambda bank, by, queries, c, *a: seen.append(len(queries)) or
                        torch.zeros(len(queries), c))
    for limit, queries in ((3, 12), (10, 40)):  # 10 = all batches: no limit
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, datamodule=dm, num_val_batches=[limit])
        online.OnlineKNN(k=2).on_validation_epoch_end(trainer, module)
        assert seen[-1] == queries
