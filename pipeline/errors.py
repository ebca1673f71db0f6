"""The two errors every salmm command reports as one line, ``"<path>: <problem>"``.

* :class:`BadInputError` - a file the user gave (raw data, a prepared dataset, a shard, a cache,
  a checkpoint, a video) is missing, corrupt or inconsistent;
* :class:`OutputError` - an output cannot be written (a full disk, no permission, a folder
  another run holds).

So a failing run over tens of thousands of frames says exactly what to fix. The problem text is
one line and carries nothing that varies from run to run (memory addresses of Python objects
are dropped), because skipped frames' problems are recorded in manifests, whose hash is the
dataset's version id.
"""

from __future__ import annotations

import re
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
