"""Offline evaluation of pre-training runs: the protocols of ``mimzoo-eval`` run on a run's ``last.ckpt``, each into
``<run_dir>/eval/<protocol>/`` (``results.json`` with ``top1`` as a 0-1 fraction: what ``mimzoo-report`` reads).

Two ways in, one code path (:func:`evaluate_run`):

- ``mimzoo-train ... offline_eval.protocols=[knn,linear]``: at the end of each training job (rank zero, same
  process), so each point of a SLURM sweep is evaluated in its own job;
- ``mimzoo-eval-sweep <sweep dir> [protocols=[knn,linear]] [mimzoo-eval overrides]``: every finished run below a
  directory, skipping (run, protocol) pairs that have their ``results.json``; a killed call is simply called again.

The evaluation's data defaults to the pre-training run's (same data set, root, image size), with the protocol's own
augmentation and epochs; any ``mimzoo-eval`` override changes it. Each result also lands in the pre-training run's
own W&B run (same id, resumed) as summary key ``offline/<protocol>_top1``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from mimzoo.errors import ConfigError, MissingFileError, user_errors

log = logging.getLogger("mimzoo")

PROTOCOL_NAMES = ("knn", "linear", "finetune")  # conf/protocol/*.yaml; evaluate.PROTOCOLS runs them
LAST = Path("checkpoints") / "last.ckpt"


def results_path(run_dir: Path, protocol: str) -> Path:
    """``<run_dir>/eval/<protocol>/results.json``: written atomically, last, only by a finished evaluation."""
    return Path(run_dir) / "eval" / protocol / "results.json"


def is_done(run_dir: Path, protocol: str) -> bool:
    """Whether ``protocol`` has its ``results.json`` for the current ``last.ckpt``: one older than the checkpoint
    (the run was trained further, or again, since) counts as not done."""
    results, ckpt = results_path(run_dir, protocol), Path(run_dir) / LAST
    return results.is_file() and (not ckpt.is_file() or results.stat().st_mtime >= ckpt.stat().st_mtime)


def protocol_overrides(offline_cfg, protocol: str) -> list[str]:
    """A run's ``offline_eval`` overrides for ``protocol``: those for every protocol, then its own."""
    if offline_cfg is None:
        return []

    def listed(value) -> list[str]:  # one override may be given as a plain string
        return [value] if isinstance(value, str) else [str(o) for o in value or []]

    return listed(offline_cfg.get("overrides")) + listed(offline_cfg.get(protocol))


def chosen_protocols(protocols) -> list[str]:
    """The protocol names, checked: an unknown one is refused before any run is touched."""
    names = [str(p) for p in (protocols or [])]
    unknown = [p for p in names if p not in PROTOCOL_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown offline protocol(s) {unknown}; choose from {list(PROTOCOL_NAMES)}, "
            "e.g. offline_eval.protocols=[knn,linear]"
        )
    return names


def _compose(overrides: list[str]) -> DictConfig:
    """``eval.yaml`` composed with ``overrides``; inside a Hydra app (``mimzoo-train``) through its own search path,
    which is the packaged config dir, else through :data:`mimzoo.runs.CONFIG_DIR`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mimzoo.runs import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="eval", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def read_run(run_dir: Path) -> tuple[DictConfig, str | None]:
    """A pre-training run's config (``.hydra/config.yaml``) and its ``data`` group choice (``.hydra/hydra.yaml``)."""
    hydra_dir = Path(run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        raise MissingFileError(f"{run_dir} has no .hydra/config.yaml: not a mimzoo-train run directory")
    cfg = OmegaConf.load(hydra_dir / "config.yaml")
    choice = None
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}
        choice = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices", {}).get("data")
    return cfg, choice


def eval_config(run_dir: Path, protocol: str, overrides: list[str]) -> DictConfig:
    """The ``mimzoo-eval`` config of ``protocol`` on this run's ``last.ckpt``: the run's data (every key but
    ``train_aug``, which the protocol sets) unless ``overrides`` choose ``data=`` or set ``data.<key>``; CSV logs
    only (the result goes to the pre-training run's W&B summary)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    train_cfg, data_choice = read_run(run_dir)
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    own_data = "data" in keys
    head = [f"protocol={protocol}", "logger=csv"] + ([f"data={data_choice}"] if data_choice and not own_data else [])
    try:
        cfg = _compose(head + overrides)
    except HydraException as err:
        raise ConfigError(
            f"offline {protocol} evaluation of {run_dir}: {str(err).splitlines()[0]} (overrides {overrides})"
        ) from None
    if cfg.logger.wandb.enabled:
        raise ConfigError(
            "offline evaluation writes its results into the pre-training run's W&B summary; drop the "
            f"logger override from its overrides ({overrides})"
        )
    with open_dict(cfg):
        if not own_data and "data" in train_cfg:
            trained_on = OmegaConf.to_container(train_cfg.data, resolve=True)
            for key, value in trained_on.items():
                if key != "train_aug" and f"data.{key}" not in keys:
                    cfg.data[key] = value
        cfg.ckpt = str(Path(run_dir).resolve() / LAST)
    return cfg


def _write_record(out_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """The evaluation's ``.hydra/config.yaml`` and ``overrides.yaml``, as a ``mimzoo-eval`` run directory has."""
    from mimzoo.rundir import atomic_write

    hydra_dir = out_dir / ".hydra"
    atomic_write(hydra_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg).encode()))
    atomic_write(hydra_dir / "overrides.yaml", lambda f: f.write(yaml.safe_dump(list(overrides)).encode()))


def evaluate_run(run_dir: Path, protocols: list[str], extra: list[str] = (), progress=None) -> dict[str, dict]:
    """Run each protocol not yet done (:func:`is_done`) on ``run_dir``'s last checkpoint; the overrides are the run's
    own ``offline_eval`` ones, then ``extra``. Returns the new results by protocol and writes their top-1 into the
    run's W&B summary. ``progress(protocol, done)`` is told of each pair before it runs."""
    from mimzoo.evaluate import evaluate

    run_dir = Path(run_dir)
    train_cfg, _ = read_run(run_dir)
    offline_cfg = train_cfg.get("offline_eval")
    new = {}
    for protocol in protocols:
        done = is_done(run_dir, protocol)
        if progress is not None:
            progress(protocol, done)
        if done:
            continue
        overrides = protocol_overrides(offline_cfg, protocol) + list(extra)
        cfg = eval_config(run_dir, protocol, overrides)
        out_dir = results_path(run_dir, protocol).parent
        _write_record(out_dir, cfg, overrides)
        new[protocol] = evaluate(cfg, out_dir)
    if new:
        record_in_wandb(run_dir, train_cfg, {f"offline/{p}_top1": r["top1"] for p, r in new.items()})
    return new


def check_config(run_dir: Path, offline_cfg) -> None:
    """Compose every protocol's config of ``offline_eval`` before training: a bad override fails the job at its
    start, not after hours of pre-training."""
    for protocol in chosen_protocols(offline_cfg.protocols):
        eval_config(run_dir, protocol, protocol_overrides(offline_cfg, protocol))


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id of a run directory (``wandb_id.txt``, written by :func:`mimzoo.runs.build_loggers`)."""
    path = Path(run_dir) / "wandb_id.txt"
    return path.read_text().strip() or None if path.is_file() else None


def record_in_wandb(run_dir: Path, train_cfg: DictConfig, summary: dict) -> None:
    """``summary`` into the pre-training run's own W&B run: the live one (inside ``mimzoo-train``), else the run
    resumed by its id in the same ``wandb/`` folder (offline mode too: ``wandb sync`` merges it by id)."""
    wb = OmegaConf.select(train_cfg, "logger.wandb")
    run_id = wandb_run_id(run_dir)
    if wb is None or not wb.enabled or run_id is None:
        return
    import wandb

    from mimzoo.runs import wandb_mode, wandb_settings

    if wandb.run is not None and wandb.run.id == run_id:
        wandb.run.summary.update(summary)
        return
    mode = wandb_mode(OmegaConf.to_container(wb, resolve=True)["mode"])
    if mode == "disabled":
        return
    run = wandb.init(
        project=wb.project,
        entity=wb.entity,
        id=run_id,
        dir=str(run_dir),
        resume="allow",
        mode=mode,
        settings=wandb_settings(mode),
    )
    run.summary.update(summary)
    run.finish()


# --- mimzoo-eval-sweep ----------------------------------------------------------------------------------------
def find_runs(root: Path) -> list[Path]:
    """Every directory below ``root`` (``root`` included) holding ``checkpoints/last.ckpt`` and ``.hydra/``."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"no such directory: {root}; pass a sweep directory, e.g. multirun/<date>/<time>")
    found = {p.parent.parent for p in root.rglob("last.ckpt") if p.parent.name == "checkpoints"}
    runs = sorted(
        (run for run in found if _is_training_run(run)),
        key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.relative_to(root).parts],
    )
    if not runs:
        raise MissingFileError(
            f"no runs under {root} (a run is a directory with checkpoints/last.ckpt and .hydra/, "
            "as `mimzoo-train -m ...` writes): pass a sweep or run directory"
        )
    return runs


def _is_training_run(run_dir: Path) -> bool:
    """A ``mimzoo-train`` run, not a probe's or fine-tune's (``eval/linear/``, a ``mimzoo-eval`` run): its config
    has no ``protocol``."""
    config = run_dir / ".hydra" / "config.yaml"
    return config.is_file() and "protocol" not in OmegaConf.load(config)


def has_encoder(train_cfg: DictConfig) -> bool:
    """Whether the run's method has features to evaluate (a tokenizer stage, BEiT's dVAE, has none)."""
    from hydra.utils import get_class

    return get_class(train_cfg.model._target_).has_features


def unfinished(run_dir: Path, train_cfg: DictConfig) -> str | None:
    """Why ``last.ckpt`` is not the end of training (stopped before ``trainer.max_steps``/``max_epochs``), or None.
    Read from the checkpoint's loop state (memory-mapped: the tensors stay on disk)."""
    from mimzoo.checkpoints import read_checkpoint
    from mimzoo.errors import CheckpointError

    try:
        ckpt = read_checkpoint(run_dir / LAST, mmap=True, fix="it is left as it is")
    except CheckpointError as err:
        return f"unreadable checkpoint ({err})"
    max_steps = OmegaConf.select(train_cfg, "trainer.max_steps", default=-1)
    max_epochs = OmegaConf.select(train_cfg, "trainer.max_epochs", default=None)
    if max_steps == 0 or (max_steps is not None and max_steps > 0 and ckpt.get("global_step", 0) >= max_steps):
        return None  # (max_steps=0: the untrained network, a comparison's floor, is finished as it is)
    epochs = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    if max_epochs and epochs is not None and epochs < max_epochs:
        return f"stopped at epoch {epochs} of {max_epochs}"
    if max_steps is not None and max_steps > 0 and not max_epochs:
        return f"stopped at step {ckpt.get('global_step')} of {max_steps}"
    return None


def evaluate_sweep(root: Path, protocols: list[str] | None, extra: list[str]) -> dict:
    """``mimzoo-eval-sweep``: every finished, idle run below ``root``; returns ``{"evaluated", "skipped"}``."""
    from mimzoo.runlock import RunDirRefused, RunLock

    runs = find_runs(root)
    plan, stages = [], []
    for run in runs:
        train_cfg, _ = read_run(run)
        if not has_encoder(train_cfg):
            stages.append(run.relative_to(root).as_posix() or ".")
            continue
        names = (
            protocols
            if protocols is not None
            else chosen_protocols(OmegaConf.select(train_cfg, "offline_eval.protocols", default=None))
        )
        if not names:
            raise ConfigError(
                f"{run} names no offline protocols (offline_eval.protocols): choose them, "
                "e.g. mimzoo-eval-sweep <dir> protocols=[knn,linear]"
            )
        plan.append((run, train_cfg, names))
    total = sum(len(names) for _, _, names in plan)
    count, already, evaluated, skipped = 0, 0, [], []

    def say(line: str) -> None:
        print(f"mimzoo-eval-sweep: {line}", flush=True)

    for name in stages:
        say(f"skip {name}: a tokenizer stage (no encoder to evaluate)")

    for run, train_cfg, names in plan:
        name = run.relative_to(root).as_posix() or "."
        try:
            lock = RunLock(run, "mimzoo-eval-sweep").acquire()  # held while we evaluate: no resume meanwhile
        except RunDirRefused:
            count += len(names)
            skipped.append(name)
            say(f"skip {name}: still training (its mimzoo.lock is held by a live run)")
            continue
        try:
            why = unfinished(run, train_cfg)
            if why:
                count += len(names)
                skipped.append(name)
                say(f"skip {name}: unfinished ({why}); resume its training first")
                continue

            def progress(protocol: str, done: bool, name: str = name) -> None:
                nonlocal count, already
                count += 1
                already += done
                state = "done already (results.json), skipped" if done else "evaluating"
                say(f"[{count}/{total}] {name} {protocol}: {state}")

            for protocol, result in evaluate_run(run, names, extra, progress).items():
                evaluated.append((name, protocol, result["top1"]))
        finally:
            lock.release()
    say(
        f"{len(evaluated)} evaluated, {already} done already, {len(skipped)} run(s) skipped; results in "
        "<run>/eval/<protocol>/results.json"
    )
    return {"evaluated": evaluated, "skipped": skipped}


def parse_protocols(value: str) -> list[str]:
    """``[knn,linear]`` or ``knn,linear`` -> ``["knn", "linear"]``."""
    return chosen_protocols([p.strip() for p in value.strip().strip("[]").split(",") if p.strip()])


def main(argv=None):
    """``mimzoo-eval-sweep <dir> [protocols=[knn,linear]] [mimzoo-eval overrides...]``."""
    from mimzoo.cli import check_overrides, quote_path_overrides, silence_unactionable_warnings

    parser = argparse.ArgumentParser(
        prog="mimzoo-eval-sweep",
        description="Evaluate every finished run below a directory with offline protocols, each into "
        "<run>/eval/<protocol>/results.json; pairs already evaluated are skipped, so a killed call is "
        "resumed by calling it again.",
    )
    parser.add_argument("dir", type=Path, help="a sweep directory (multirun/<date>/<time>) or a run directory")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="protocols=[knn,linear] (default: each run's offline_eval.protocols), then mimzoo-eval "
        "overrides for every protocol, e.g. trainer.max_epochs=10 data.batch_size=128",
    )
    args = parser.parse_args(argv)
    silence_unactionable_warnings()
    with user_errors("mimzoo-eval-sweep"):
        protocols, extra = None, []
        for arg in quote_path_overrides(args.overrides):
            if arg.startswith("protocols="):
                protocols = parse_protocols(arg.split("=", 1)[1])
            else:
                extra.append(arg)
        check_overrides(extra)
        evaluate_sweep(args.dir, protocols, extra)


if __name__ == "__main__":
    main()
