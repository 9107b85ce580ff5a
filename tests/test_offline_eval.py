"""Offline evaluation of a sweep's runs: ``offline_eval`` at the end of each training job, ``mimzoo-eval-sweep``
over an existing sweep, each result in ``<run>/eval/<protocol>/results.json`` and the run's own W&B summary."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import TINY
from mimzoo.errors import ConfigError, MissingFileError, UserExit
from mimzoo.offline_eval import eval_config, evaluate_sweep, main, results_path, unfinished

SHORT = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "probe.knn.enabled=false",
    "recon.enabled=false",
]


def wandb_summaries(path: Path) -> dict:
    """The summary updates of an offline W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf
    records, 32 KiB blocks, 7-byte record headers), merged in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, summary = path.read_bytes(), 32768, 7, b"", {}
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                summary.update({u.key: json.loads(u.value_json) for u in record.summary.update if u.key})
    return summary


def run_summary(run: Path) -> dict:
    """Every summary key written into the run's W&B run (all its offline folders: the training and resumes)."""
    run_id = (run / "wandb_id.txt").read_text().strip()
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline W&B run {run_id} in {run / 'wandb'}"
    out = {}
    for f in files:
        out.update(wandb_summaries(f))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cli):
    """A 2-point tiny sweep trained with ``offline_eval.protocols=[knn]`` (k overridden per protocol), W&B offline."""
    root = tmp_path_factory.mktemp("offline") / "sweep"
    env_mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        cli(
            "train",
            "-m",
            *TINY,
            *SHORT,
            "mask.ratio=0.5,0.75",
            "offline_eval.protocols=[knn]",
            "offline_eval.knn=['protocol.k=5']",
            f"hydra.sweep.dir={root}",
        )
    finally:
        os.environ["WANDB_MODE"] = env_mode or "disabled"
    return root


@pytest.mark.slow
def test_training_evaluates_each_run_into_its_dir_and_wandb_summary(sweep):
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [r.name for r in runs] == ["0", "1"]
    for run in runs:
        results = json.loads(results_path(run, "knn").read_text())
        assert 0 <= results["top1"] <= 1 and results["k"] == 5  # the per-protocol override reached it
        assert results["data"] == "cifar10-mini" and results["bank_size"] == 512  # the run's data, whole
        assert Path(results["ckpt"]) == (run / "checkpoints" / "last.ckpt").resolve()
        assert run_summary(run)["offline/knn_top1"] == pytest.approx(results["top1"])


@pytest.mark.slow
def test_sweep_command_fills_skips_redoes_and_waits_for_live_runs(sweep, tmp_path, cli, capsys):
    from mimzoo.runlock import RunLock

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for run in ("0", "1"):
        shutil.rmtree(copy / run / "eval")
    # Run 1 is "still training": its lock is held (by this process), so the command leaves it alone.
    lock = RunLock(copy / "1", "test").acquire()
    try:
        env = dict(os.environ, WANDB_MODE="offline")
        proc = subprocess.run(
            [sys.executable, "-m", "mimzoo.offline_eval", str(copy), "protocols=[knn]"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        lock.release()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] 0 knn: evaluating" in proc.stdout and "skip 1: still training" in proc.stdout
    assert results_path(copy / "0", "knn").is_file() and not results_path(copy / "1", "knn").exists()
    assert json.loads(results_path(copy / "0", "knn").read_text())["k"] == 5  # the run's own offline_eval overrides
    os.environ["WANDB_MODE"] = "offline"
    try:
        evaluate_sweep(copy, ["knn"], [])  # now run 1 is idle: evaluated, run 0 skipped
        first = results_path(copy / "0", "knn").stat().st_mtime_ns
        out = capsys.readouterr().out
        assert "[1/2] 0 knn: done already" in out and "[2/2] 1 knn: evaluating" in out
        evaluate_sweep(copy, ["knn"], [])  # everything done: nothing runs
        out = capsys.readouterr().out
        assert "0 evaluated, 2 done already" in out and "evaluating" not in out
        # An evaluation killed mid-way: no results.json, its dead lock and a half-written temp file left behind.
        results = results_path(copy / "1", "knn")
        results.unlink()
        (results.parent / "mimzoo.lock").write_text(yaml.safe_dump({"pid": 2**22 + 1, "host": os.uname().nodename}))
        stale = results.parent / ".results.json.mimzoo-tmp-1"
        stale.write_text('{"top1": 0.')
        evaluate_sweep(copy, ["knn"], [])  # redone cleanly; the other run kept
        out = capsys.readouterr().out
        assert "[2/2] 1 knn: evaluating" in out and "1 evaluated, 1 done already" in out
        assert json.loads(results.read_text())["top1"] >= 0 and not stale.exists()
        assert not (results.parent / "mimzoo.lock").exists()
        assert results_path(copy / "0", "knn").stat().st_mtime_ns == first
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    assert (
        run_summary(copy / "1")["offline/knn_top1"] == json.loads(results_path(copy / "1", "knn").read_text())["top1"]
    )
    # A run stopped before its max_epochs (killed, preempted) is skipped, not evaluated half-way.
    config = copy / "0" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("max_epochs: 1", "max_epochs: 5"))
    results_path(copy / "0", "knn").unlink()
    assert unfinished(copy / "0", OmegaConf.load(config)) == "stopped at epoch 1 of 5"
    assert evaluate_sweep(copy, ["knn"], [])["skipped"] == ["0"]
    assert "skip 0: unfinished (stopped at epoch 1 of 5)" in capsys.readouterr().out
    assert not results_path(copy / "0", "knn").exists()


def fake_run(root: Path, **data) -> Path:
    """A run directory as far as :func:`eval_config` reads it: ``.hydra/config.yaml`` and ``hydra.yaml``."""
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = {
        "data": {
            "_target_": "mimzoo.data.MIMDataModule",
            "name": "cifar10-mini",
            "root": "${oc.env:MIMZOO_DATA}",
            "download": False,
            "image_size": 32,
            "patch_size": 4,
            "batch_size": 7,
            "num_workers": 0,
            "train_aug": "mae",
            "crop_pct": 1.0,
            **data,
        }
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"data": "cifar10_mini"}}}})
    )
    return run


def test_eval_config_defaults_to_the_runs_data_and_takes_overrides(tmp_path):
    run = fake_run(tmp_path)
    cfg = eval_config(run, "linear", [])
    assert cfg.data.name == "cifar10-mini" and cfg.data.batch_size == 7 and cfg.data.num_workers == 0
    assert cfg.data.root == os.environ["MIMZOO_DATA"]
    assert cfg.data.train_aug == "linear"  # the protocol's augmentation, not the pre-training's
    assert cfg.trainer.max_epochs == 90 and not cfg.logger.wandb.enabled
    assert cfg.ckpt == str((run / "checkpoints" / "last.ckpt").resolve())
    cfg = eval_config(run, "linear", ["data.batch_size=16", "trainer.max_epochs=2"])
    assert cfg.data.batch_size == 16 and cfg.trainer.max_epochs == 2 and cfg.data.num_workers == 0
    cfg = eval_config(run, "knn", ["data=cifar10"])  # another data set: none of the run's data keys
    assert cfg.data.name == "cifar10" and cfg.data.batch_size == 256
    with pytest.raises(ConfigError, match="offline knn evaluation"):
        eval_config(run, "knn", ["protocol.nonexistent=1"])
    with pytest.raises(ConfigError, match="drop the logger override"):
        eval_config(run, "knn", ["logger=default"])


def test_bad_directory_or_protocol_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="no runs under"):
        evaluate_sweep(tmp_path, ["knn"], [])
    with pytest.raises(UserExit) as err:
        main([str(tmp_path / "missing"), "protocols=[knn]"])
    assert str(err.value).startswith("mimzoo-eval-sweep: error: no such directory")
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(UserExit, match="unknown offline protocol"):
        main([str(tmp_path), "protocols=[knn,probe]"])


def test_unquoted_override_list_names_the_quoted_form():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mimzoo.cli import check_overrides

    with pytest.raises(ConfigError) as err:
        check_overrides(["offline_eval.linear=[trainer.max_epochs=2,protocol.blr=10]"])
    fix = str(err.value).split('e.g. "')[1].split('"')[0]
    assert fix == "offline_eval.linear=['trainer.max_epochs=2','protocol.blr=10']"
    assert OverridesParser.create().parse_overrides([fix])[0].value() == ["trainer.max_epochs=2", "protocol.blr=10"]
