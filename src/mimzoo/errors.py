"""Bad input, reported as such: the exception types of a user's mistake, and how entry points show them.

Code that finds bad input (a corrupt data file, a checkpoint of the wrong kind, a config key that cannot
work) raises one of the :class:`UserError` types below with a message that names the file or key and the
fix. Each also derives from the built-in type such code raised before (``ValueError``,
``FileNotFoundError``), so callers that catch those keep working. The entry points (``mimzoo-train``,
``mimzoo-eval``, ``mimzoo-export``, ``mimzoo-import``) run inside :func:`user_errors`, which turns a
:class:`UserError` (also when it arrives wrapped: Hydra's instantiate, a DataLoader worker) into one line
``mimzoo-<cmd>: error: <message>`` and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys


class UserError(Exception):
    """Bad input from the user: shown as one line, exit code 2, no traceback."""


class ConfigError(UserError, ValueError):
    """A config key (or command-line override) that cannot work."""


class DataError(UserError, ValueError):
    """A data file or folder that cannot be read, or data that cannot fill a batch."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable or of the wrong kind for the command."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or the config implies) that does not exist."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """``err`` itself or the first :class:`UserError` in its ``raise ... from`` chain (Hydra's
    ``InstantiationException`` wraps the constructor's error that way), else None. Only explicit causes
    count: an exception raised while handling a UserError is a bug of its own."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    its last line holds the original message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = last[len(name) :] if last.startswith(name) else last.split(": ", 1)[-1]
    return " ".join(text.split())


class UserExit(SystemExit):
    """Exit code 2 whose ``str`` is the printed line, so callers of an entry point's ``main`` (and tests) read
    what the user saw."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


@contextlib.contextmanager
def user_errors(prog: str):
    """Run an entry point's body: a :class:`UserError` ends the process with ``<prog>: error: <message>``
    on stderr and exit code 2 (argparse's convention for usage errors); other exceptions propagate."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is (or wraps) a UserError
        user = find_user_error(err)
        if user is None:
            raise
        line = f"{prog}: error: {one_line(user)}"
        print(line, file=sys.stderr, flush=True)
        raise UserExit(line) from None
