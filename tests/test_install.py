"""A non-editable install runs on its own: build the wheel, install it into a fresh venv (the
dependencies made visible through a ``.pth`` file, never the repo's ``src``), run every console
script from a directory outside the repo, and add a config folder of the user's own through
``hydra.searchpath``."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=csv"]


def run(cmd, cwd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, a working directory outside the repo, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("WANDB_MODE", "disabled")  # MIMZOO_DATA comes from conftest
    # Build from a copy of what the wheel is made of, so the repo gets no build/ or *.egg-info.
    project = tmp / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp / "wheels",
            project,
        ],
        tmp,
        env,
    )
    (wheel,) = (tmp / "wheels").glob("mimzoo-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    # Install before the dependencies become visible, so pip sees no other mimzoo (the editable one).
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    # The dependencies: this interpreter's site-packages, listed in a .pth file. The .pth files in
    # that folder are not processed, so an editable mimzoo installed there stays inactive.
    purelib = Path(
        run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip()
    )
    (purelib / "_mimzoo_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    where = run(
        [python, "-c", "import mimzoo, mimzoo.train as t; print(mimzoo.__file__); print(t.CONFIG_DIR)"], work, env
    ).stdout.split()
    for path in where:  # the package and its configs come from the venv, not the repo
        assert Path(path).resolve().is_relative_to(venv.resolve()), where
    assert Path(where[1], "model", "encoder", "test.yaml").is_file()
    assert Path(where[1], "hydra", "launcher", "slurm.yaml").is_file()
    return venv / "bin", work, env


@pytest.mark.slow
def test_installed_console_scripts_run_outside_the_repo(installed):
    bin_dir, work, env = installed
    run_dir = work / "runs" / "tiny"
    proc = run([bin_dir / "mimzoo-train", *TINY, *FAST, f"hydra.run.dir={run_dir}"], work, env)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and "final metrics" in proc.stdout

    eval_dir = work / "runs" / "knn"
    run(
        [
            bin_dir / "mimzoo-eval",
            "protocol=knn",
            f"ckpt={ckpt}",
            "data=cifar10_mini",
            "data.num_workers=0",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={eval_dir}",
        ],
        work,
        env,
    )
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["protocol"] == "knn" and 0.0 <= results["top1"] <= 1.0

    run([bin_dir / "mimzoo-export", ckpt, work / "vit.pth"], work, env)
    assert (work / "vit.pth").stat().st_size > 0 and json.loads((work / "vit.pth.json").read_text())

    proc = run([bin_dir / "mimzoo-report", run_dir], work, env)
    assert (run_dir / "report.md").is_file() and "mimzoo: report" in proc.stdout

    proc = run([bin_dir / "mimzoo-import", "--help"], work, env)
    assert "mae" in proc.stdout


@pytest.mark.slow
def test_user_config_folder_through_searchpath(installed, tmp_path):
    """A preset and a data config of the user's own, outside the package, found through the search path."""
    bin_dir, work, env = installed
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "data").mkdir()
    (conf / "data" / "my_mini.yaml").write_text(
        "defaults:\n  - cifar10_mini\n  - _self_\nbatch_size: 16\nnum_workers: 0\n"
    )
    (conf / "experiment" / "my_tiny.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /data: my_mini\n  - override /model/encoder: test\n"
        "model:\n  decoder: {dim: 24, depth: 1, num_heads: 2}\n"
        "mask:\n  ratio: 0.5\n"
        "trainer: {max_steps: 3, limit_val_batches: 1, enable_progress_bar: false}\n"
        "probe:\n  knn: {enabled: false}\n"
    )
    run_dir = tmp_path / "run"
    run(
        [
            bin_dir / "mimzoo-train",
            f"hydra.searchpath=[file://{conf}]",
            "experiment=my_tiny",
            "logger=csv",
            f"hydra.run.dir={run_dir}",
        ],
        work,
        env,
    )
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.data.name, cfg.data.batch_size, cfg.mask.ratio, cfg.model.decoder.dim) == ("cifar10-mini", 16, 0.5, 24)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"]["decoder.mask_token"].shape[-1] == 24
