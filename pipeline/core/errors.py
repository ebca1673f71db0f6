"""The two errors every salmm command reports as one line, ``"<path>: <problem>"``.

* :class:`BadInputError` - a file the user gave (raw data, a prepared dataset, a shard, a cache,
  a checkpoint, a video) is missing, corrupt or inconsistent;
* :class:`OutputError` - an output cannot be written (a full disk, no permission, a folder
  another run holds); :func:`output_error` makes one of a failed write's OSError.

So a failing run over tens of thousands of frames says exactly what to fix. The problem text is
one line and carries nothing that varies from run to run (memory addresses of Python objects
are dropped), because skipped frames' problems are recorded in manifests, whose hash is the
dataset's version id.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable, Mapping
from os import PathLike

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _one_line(problem: str) -> str:
    return _ADDRESS.sub("", " ".join(str(problem).split()))


class BadInputError(Exception):
    """A user's input file is missing, corrupt or inconsistent.

    ``str(err)`` is the one-line message ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


class OutputError(Exception):
    """An output cannot be written: ``str(err)`` is ``"<path>: <problem>"``, one line."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""The errors of a write the user can fix: a full disk or quota, a read-only file system, no
permission."""


def output_error(err: OSError, path: str | PathLike[str] | None = None) -> OutputError | None:
    """The one-line OutputError ``"<path>: cannot be written (<reason>)"`` for a failed write
    (``path``: the output it was for; default the file the error names), or None when ``err``
    is not one of :data:`WRITE_ERRNOS`. Inputs that cannot be read are BadInputErrors raised
    where they are read, so these errnos reaching a command's top are its writes."""
    if err.errno not in WRITE_ERRNOS:
        return None
    where = path if path is not None else (err.filename or "output")
    return OutputError(where, f"cannot be written ({err.strerror or type(err).__name__})")


def run_reporting(action: Callable[[], int | None], log: logging.Logger,
                  failures: Mapping[type[Exception], int] | None = None) -> int:
    """Run a command's ``action``; its exit status: what it returned (an int; None is 0), or,
    after one logged line saying what is wrong, 2 for bad input, 1 for an output that cannot be
    written (:func:`output_error` of a failed write included), 130 for Ctrl-C, and the code
    ``failures`` gives any other expected exception."""
    codes = {BadInputError: 2, OutputError: 1, **(failures or {})}
    try:
        status = action()
    except tuple(codes) as err:
        log.error("%s", err)
        return next(code for kind, code in codes.items() if isinstance(err, kind))
    except OSError as err:
        if (found := output_error(err)) is None:
            raise
        log.error("%s", found)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return status if isinstance(status, int) else 0
