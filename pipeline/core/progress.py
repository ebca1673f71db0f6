"""Progress of long jobs: a live bar on a terminal, a log line every so often elsewhere.

A ``tqdm`` bar redraws its line with carriage returns. Where stderr is not a terminal - a log
file, a CI job, a Prefect run, ``subprocess`` capture - those redraws pile up on one line and
the next log message is glued onto it, so there :func:`progress` gives a :class:`LogProgress`
instead: the same calls (``update``, ``set_postfix``, ``close``, a context manager), and one
plain log line every :data:`LOG_EVERY_S` seconds and at the end of anything that took at least
:data:`QUIET_UNDER_S` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Self, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 30.0
QUIET_UNDER_S = 5.0
log = logging.getLogger("progress")


class LogProgress:
    """tqdm's interface, reporting through :mod:`logging`: ``"<desc>: n/total unit (rate/s)"``
    every ``every_s`` seconds, and once when closed if it ran :data:`QUIET_UNDER_S` or more."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 every_s: float = LOG_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._report(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _report(self, now: float) -> None:
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        total = f"/{self.total}" if self.total is not None else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %d%s %s (%.3g %s/s)%s", self.desc, self.n, total, self.unit, rate,
                 self.unit, extra)

    def close(self) -> None:
        now = time.monotonic()
        if not self._closed and self.n and now - self._start >= QUIET_UNDER_S:
            self._report(now)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, **tqdm_options: Any) -> tqdm | LogProgress:
    """A progress reporter for a job of ``total`` ``unit``s: a tqdm bar when stderr is a
    terminal, else a :class:`LogProgress`; ``disable`` reports nothing (a bar that never
    shows)."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable,
                    **{"dynamic_ncols": True, **tqdm_options})
    return LogProgress(total, desc, unit)


Progress = tqdm | LogProgress


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
          disable: bool = False, **tqdm_options: Any) -> Iterator[T]:
    """``items``, reporting progress one item at a time (see :func:`progress`)."""
    with progress(total, desc, unit, disable, **tqdm_options) as bar:
        for item in items:
            yield item
            bar.update(1)
