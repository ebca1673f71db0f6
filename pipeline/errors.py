"""Errors raised for bad raw inputs.

Every problem with a user's files is reported as one line that names the file and
the problem, so a failing run over tens of thousands of frames says exactly what to fix.
"""

from __future__ import annotations

from os import PathLike


class BadInputError(Exception):
    """A raw input file is missing, corrupt or inconsistent.

    ``str(err)`` is the one-line message ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(problem.split())
        super().__init__(f"{self.path}: {self.problem}")
