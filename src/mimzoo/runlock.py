"""One live run per run directory: ``<run_dir>/mimzoo.lock`` (see :class:`RunLock`).

Standard library and PyYAML only, so a process can take or test the lock without importing torch."""

from __future__ import annotations

import atexit
import datetime
import errno
import logging
import os
import socket
import sys
from pathlib import Path

import yaml

log = logging.getLogger("mimzoo")

LOCK_NAME = "mimzoo.lock"


class RunDirRefused(SystemExit):
    """A launch refused for what its run directory holds (a live run, a resume that changes the experiment).

    A :class:`SystemExit`, so the message reaches the user as one paragraph (Hydra reports ``Exception`` s as
    tracebacks) and the exit status is 1; library callers can catch it by this class."""


def launch_rank_zero() -> bool:
    """Whether this process is the launching one (not a DDP/SLURM rank > 0, which runs the same command)."""
    return all(int(os.environ.get(var, 0) or 0) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


_HELD: dict[str, RunLock] = {}  # locks this process holds, by path: a sweep's next job in the same dir re-enters


class RunLock:
    """``<run_dir>/mimzoo.lock``: an exclusive ``fcntl.flock`` held for the run's lifetime (the kernel frees it
    when the process dies, even by SIGKILL) and, inside, who holds it. A second launch in the directory is
    refused with the holder's pid, host and command; a lock file left by a dead run is taken over with a note.
    Where the filesystem has no working ``flock``, liveness falls back to the pid (same host) or the SLURM job
    id (a requeued job takes its own lock over)."""

    def __init__(self, run_dir: Path, tool: str):
        self.path = Path(run_dir) / LOCK_NAME
        self.tool = tool
        self.fd: int | None = None

    def describe(self, holder: dict) -> str:
        if not holder:
            return "a run whose lock file is empty (it is starting, or its file system lost the content)"
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (
            f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {holder.get('started')}: "
            f"{holder.get('command')}"
        )

    def _read(self) -> dict:
        try:
            return yaml.safe_load(self.path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}

    def _refuse(self, holder: dict):
        run_dir = self.path.parent
        raise RunDirRefused(
            f"{self.tool}: error: {run_dir} is in use by another live run ({self.describe(holder)}).\n"
            f"Two runs in one directory would overwrite each other's checkpoints, metrics.csv and W&B run. Wait for "
            f"that run to end, or start this one in another directory (hydra.run.dir=<new dir>). "
            f"Lock file: {self.path}"
        )

    def _fallback_stale(self, holder: dict) -> bool:
        """Without flock: whether the recorded holder is gone (dead pid on this host, or our own SLURM job)."""
        if not holder:
            return True
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return True
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            return pid == os.getpid() or not _pid_alive(pid)
        return False

    def acquire(self) -> RunLock:
        key = str(self.path.resolve())
        if key in _HELD:
            return _HELD[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                holder = self._read()
                os.close(fd)
                self._refuse(holder)
            except (ImportError, OSError) as err:  # no flock here (e.g. a Lustre mount without -o flock)
                if isinstance(err, OSError) and err.errno not in (
                    errno.ENOLCK,
                    errno.ENOSYS,
                    errno.EINVAL,
                    errno.EOPNOTSUPP,
                ):
                    os.close(fd)
                    raise
                locked = False
            # The file may have been removed (a clean exit) between our open and our flock: retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = self._read()
        if not locked and previous and not self._fallback_stale(previous):
            os.close(fd)
            self._refuse(previous)
        if previous and int(previous.get("pid", -1)) != os.getpid():
            log.warning("mimzoo: taking over the lock of a run that is no longer running (%s)", self.describe(previous))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "tool": self.tool,
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, yaml.safe_dump(me, sort_keys=False).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD[key] = self
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.pop(str(self.path.resolve()), None)
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()  # while still locked, so no one holds a lock on a file we then remove
        except FileNotFoundError:
            pass
        os.close(self.fd)  # frees the flock
        self.fd = None
