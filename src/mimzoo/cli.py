"""What the Hydra entry points (``mimzoo-train``, ``mimzoo-eval``) do around the job: paths with ``=`` on the
command line, where log records and warnings go, and the few library warnings nobody can act on."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from mimzoo.errors import ConfigError

# Hydra options whose next argument is a value, not an override.
_OPTIONS_WITH_VALUE = {
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "-i",
    "--info",
}
_OVERRIDE = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z_][\w.@/:-]*)=(?P<value>.*)", re.S)
_GRAMMAR = set("'\"\\()[]{},$")  # values with any of these are Hydra grammar (sweeps, lists, functions, quotes)


def quote_path_overrides(args: list[str]) -> list[str]:
    """``ckpt=runs/x/epoch=3-step=100.ckpt`` -> ``ckpt='runs/x/epoch=3-step=100.ckpt'``.

    Hydra's override grammar rejects a bare ``=`` inside a value ("mismatched input '='"), and Lightning
    names checkpoints ``epoch=3-step=100.ckpt``. A value with ``=`` and none of the grammar's special
    characters can only be a plain string, so quoting it changes nothing else. A value that also holds
    grammar characters (a comma sweep, a list) is left alone; :func:`check_overrides` then names the fix.
    """
    out, skip_next = [], False
    for arg in args:
        if skip_next or arg.startswith("-"):
            out.append(arg)
            skip_next = arg in _OPTIONS_WITH_VALUE
            continue
        match = _OVERRIDE.fullmatch(arg)
        value = match["value"] if match else ""
        if "=" in value and not (_GRAMMAR & set(value)) and value == value.strip():
            arg = f"{match['key']}='{value}'"
        out.append(arg)
    return out


def check_overrides(args: list[str]) -> None:
    """Refuse, with the form that works, an override Hydra cannot parse because of ``=`` in its value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, skip_next = OverridesParser.create(), False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in _OPTIONS_WITH_VALUE
            continue
        match = _OVERRIDE.fullmatch(arg)
        if not match or "=" not in match["value"]:
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            key, value = match["key"], match["value"]
            if value.startswith("[") and value.endswith("]"):  # a list of overrides (offline_eval.<protocol>)
                items = ",".join(f"'{v.strip()}'" for v in value[1:-1].split(","))
                raise ConfigError(
                    f"cannot parse the override {arg!r} ({str(err).splitlines()[0]}): list items holding "
                    f"'=' must each be quoted for Hydra, e.g. \"{key}=[{items}]\" (the double quotes "
                    "are for the shell)"
                ) from None
            raise ConfigError(
                f"cannot parse the override {arg!r} ({str(err).splitlines()[0]}): a value holding '=' must be quoted "
                f"for Hydra, e.g. \"{key}='{value}'\" (the double quotes are for the shell)"
            ) from None


def prepare_argv(prog: str) -> None:
    """Quote paths with ``=`` in ``sys.argv`` (see :func:`quote_path_overrides`) before Hydra parses it."""
    from mimzoo.errors import user_errors

    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    with user_errors(prog):
        check_overrides(sys.argv[1:])


def available_cores() -> int:
    """CPU cores this process may run on (the scheduler's allotment under SLURM/cgroups, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cpu_devices(trainer_cfg) -> None:
    """On CPU, ``trainer.devices=N`` starts N training processes: refuse more than there are cores (each process
    would share a core with others and the run crawls, or the machine thrashes)."""
    import torch

    accelerator, devices = str(trainer_cfg.get("accelerator", "auto")), trainer_cfg.get("devices", 1)
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if not on_cpu:
        return
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else None
    cores = available_cores()
    if count is not None and count > cores:
        raise ConfigError(
            f"trainer.devices={devices} starts {count} CPU training processes but this machine gives "
            f"the run {cores} core(s): set trainer.devices={cores} or less "
            "(on CPU each device is a process)"
        )


def route_logs_to_job_log() -> None:
    """Inside a Hydra job: Lightning's records and Python warnings go through the root logger, so the job's
    log file (``train.log``/``eval.log`` in the run dir, ``hydra/job_logging/mimzoo.yaml``) holds them, as
    the console (stderr) does. Lightning adds stream handlers of its own on import (``lightning`` always;
    ``lightning.pytorch``/``lightning.fabric`` when imported before Hydra set up logging, as here); they are
    replaced by propagation to root."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lib = logging.getLogger(name)
        for handler in [h for h in lib.handlers if type(h) is logging.StreamHandler]:
            lib.removeHandler(handler)
        lib.propagate = True
    logging.captureWarnings(True)


class NotInConsole(logging.Filter):
    """For the console handler: drop records meant for the log file only (the run summary, printed on
    stdout already, goes to the log file through the ``mimzoo.summary`` logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("mimzoo.summary")


def silence_unactionable_warnings() -> None:
    """Targeted filters for warnings from inside libraries that no setting of ours or the user's removes
    (each says why); everything else still shows."""
    # Lightning 2.6's own pytree helper builds torch's deprecated LeafSpec (torch>=2.10 FutureWarning):
    # Lightning's code, not ours or the user's; gone when Lightning stops using it.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # Under bf16-mixed (the default on bf16 hardware) Lightning's model summary says it sizes parameters at 32 bits,
    # which is what they are stored in: the summary is right and there is nothing to change.
    warnings.filterwarnings("ignore", r"Precision bf16-mixed is not supported by the model summary")
    # Lightning advertises its paid services at every Trainer start (rank_zero_info); not a warning and
    # nothing to act on (logging filter: it is a log record, not a Python warning).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_tips)
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(_drop_tips)
    # timm's cosine scheduler notes "will have no effect ... t_initial = t_mul = eta_mul = 1" when the cosine part
    # is one step long, i.e. warm-up fills the run (any run shorter than optim.warmup_epochs): mimzoo sets no cycle
    # parameters, so the note names nothing a user can change.
    logging.getLogger("timm.scheduler.cosine_lr").addFilter(lambda rec: "will have no effect" not in rec.getMessage())


def _drop_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")
