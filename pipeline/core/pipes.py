"""Small stream stages that know nothing of what flows through them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Self

_DONE = object()
JOIN_S = 2.0
"""How long leaving a :class:`Latest` loop waits for the source's current item."""


def prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead; exceptions in the
    thread re-raise here, and leaving the loop early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except Exception as err:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Sink:
    """``consume(item)`` for each item given to :meth:`put`, in order, in a background thread,
    at most ``depth`` items waiting (``put`` blocks beyond). Used as a ``with`` block: leaving
    it waits until every item put before is consumed. The consumer's first failure re-raises
    from the next ``put``, or on leaving the block when nothing else is raised there; the items
    put after the failure are not consumed."""

    def __init__(self, consume: Any, depth: int) -> None:
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._work, name="sink", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def _work(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self._consume(item)
                except Exception as err:  # noqa: BLE001 -- the producer re-raises it
                    self._error = err

    def put(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if self._error is not None and kind is None:
            raise self._error


class Latest:
    """Iterate ``items`` (a live source: a camera) in a background thread, handing out only the
    newest item each time the consumer asks: items that arrive while the consumer is busy are
    dropped (counted in ``dropped``), so a slow consumer works on current items instead of an
    ever older backlog. Exceptions in the thread re-raise here; leaving the loop early stops
    the thread (after the source's current item, waiting at most :data:`JOIN_S`)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items
        self.dropped = 0

    def __iter__(self) -> Iterator[Any]:
        ready = threading.Condition()
        slot: list[Any] = []                    # at most one item waiting
        stop = threading.Event()

        def work() -> None:
            outcome: Any = _DONE
            try:
                for item in self.items:
                    with ready:
                        if stop.is_set():
                            return
                        if slot:
                            self.dropped += 1
                        slot[:] = [item]
                        ready.notify()
            except Exception as err:  # noqa: BLE001 -- handed to the consumer, which re-raises it
                outcome = err
            with ready:
                slot.append(outcome)            # after the last item, so that one is not lost
                ready.notify()

        thread = threading.Thread(target=work, name="latest", daemon=True)
        thread.start()
        try:
            while True:
                with ready:
                    while not slot:
                        ready.wait()
                    item = slot.pop(0)
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with ready:
                stop.set()
            thread.join(timeout=JOIN_S)          # a stalled source is left to its daemon thread
