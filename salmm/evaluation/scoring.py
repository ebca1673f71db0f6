"""Scoring frames: one frame's official scores under its own seeded generator, and the pool that
scores many in processes or on a Dask cluster, in submission order.

Each frame's random draws (AUC-Borji samples, AUC-Judd jitter) come from a generator seeded by
(seed, sample key), so the scores do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from salmm.evaluation import metrics
from salmm.evaluation.protocols import PROTOCOLS


def frame_seed(seed: int, key: str) -> list[int]:
    """Entropy of one frame's generator: the run's seed and 64 bits of sha256 of its key."""
    return [seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")]


SPREAD_METRICS = ("AUC_B", "AUC_J")
"""The metrics with random draws, scored under every seed of ``--seeds``."""


def score_frame(pred: np.ndarray | None, label: np.ndarray, fixations: np.ndarray | None,
                seeds: Sequence[int], key: str, jitter: bool,
                protocol: tuple[str, np.ndarray | None] | None = None,
                shape: tuple[int, int] = metrics.FIXATION_SHAPE) -> dict[str, Any]:
    """One frame's scores (a pool task): :func:`salmm.evaluation.metrics.evaluate_frame` with the frame's
    own generator for the first seed, and with more than one seed a ``"spread"`` entry: for
    each of :data:`SPREAD_METRICS`, its score under every seed (the first's included). ``pred``
    None is the uniform baseline (:func:`salmm.evaluation.metrics.uniform_scores`). ``protocol``
    (a :data:`~salmm.evaluation.protocols.PROTOCOLS` name and its base map) adds a
    ``"protocol"`` entry: that benchmark's own scores of the frame (IG NaN without a base).
    ``shape``: (height, width) of the frame the ``fixations`` are on."""
    if pred is None:
        scores: dict[str, Any] = metrics.uniform_scores(label, fixations)
        extra = [scores] * (len(seeds) - 1) if fixations is not None else []
    else:
        rng = np.random.default_rng(frame_seed(seeds[0], key))
        scores = metrics.evaluate_frame(pred, label, fixations, rng=rng, jitter=jitter,
                                        shape=shape)
        extra = [metrics.frame_aucs(pred, fixations, jitter=jitter, shape=shape,
                                    rng=np.random.default_rng(frame_seed(seed, key)))
                 for seed in seeds[1:]] if fixations is not None else []
    if extra:
        scores["spread"] = {m: [scores[m]] + [e[m] for e in extra] for m in SPREAD_METRICS}
    if protocol is not None:
        name, base = protocol
        shown = np.ones_like(label) if pred is None else pred
        scores["protocol"] = PROTOCOLS[name].score(
            shown, label, np.full_like(label, np.nan) if base is None else base)
    return scores


class FramePool:
    """Scores frames in ``workers`` processes (0: in this process) or, given a Dask ``client``,
    on its cluster (one task a frame); results in submission order; at most four frames per
    worker wait, so memory stays flat."""

    def __init__(self, workers: int, client: Any = None) -> None:
        self.client = client
        if client is not None:
            workers = max(1, sum(client.nthreads().values()))
        self.workers = workers
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers > 0 and client is None else None)
        self._pending: deque[Any] = deque()

    def submit(self, *args: Any) -> Iterator[dict[str, float]]:
        """Queue one frame; yields the results that are due (oldest first)."""
        if self.client is not None:
            self._pending.append(self.client.submit(score_frame, *args, pure=False))
        elif self._pool is not None:
            self._pending.append(self._pool.submit(score_frame, *args))
        else:
            yield score_frame(*args)
            return
        while len(self._pending) > 4 * self.workers:
            yield self._pending.popleft().result()

    def drain(self) -> Iterator[dict[str, float]]:
        """The remaining results, in order."""
        while self._pending:
            yield self._pending.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
