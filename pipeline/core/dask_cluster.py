"""One way to get a Dask client for the pipeline's parallel work.

``dask_client()`` starts a quiet ``LocalCluster`` sized to the machine (one single-threaded
worker process per usable core, no dashboard) and closes it afterwards;
``dask_client(address="tcp://host:8786")`` connects to a cluster someone else runs and leaves it
running. Either way the caller gets a ``distributed.Client`` and uses it the same way, so code
tested against a local cluster runs unchanged on a real one.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from pipeline.core.cpu import usable_cores
from pipeline.core.errors import BadInputError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20
DEBUG_LOG_LENGTH = 0
"""Messages the local cluster's connections keep for debugging (Dask's default: the last 1,000
per connection). A compute-task message carries its task's arguments, so with normalize's frame
chunks the logs held every frame submitted so far (measured: 8,524 live frame records after
8,000 frames) and the main process grew with the dataset."""


@contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Ctrl-C reaches every process of the terminal's process group. The worker processes are
    started with SIGINT ignored (an ignored signal stays ignored in a new Python process), so
    only this process hears it: it says one line and closes the cluster, which stops them -
    instead of each worker printing its own KeyboardInterrupt traceback. The caller's handler
    is back as soon as the workers are started."""
    if threading.current_thread() is not threading.main_thread():
        yield                                   # signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _quiet_logger(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` or above meanwhile. LocalCluster's ``silence_logs`` quiets
    only distributed's own stream handler, which distributed leaves out (its records go to the
    root logger's handler) when the command configured logging before importing it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


@contextmanager
def dask_client(address: str | None = None, workers: int | None = None) -> Iterator[Client]:
    """A Dask client: connected to ``address`` if given, else to a new local cluster.

    The local cluster has ``workers`` processes (default: ``usable_cores()``), one thread each
    (the per-frame work is CPU-bound Python/C that holds the GIL in places), no dashboard, and
    its log noise silenced: this process's below ERROR, the workers' below CRITICAL (a worker
    whose heartbeat meets a scheduler already closed, as on Ctrl-C, logs that as an ERROR with
    a traceback; a task's failure reaches the caller as its exception). ``workers`` must not be
    combined with ``address``.
    An address nobody answers on is a BadInputError naming it.
    """
    if address is not None:
        if workers is not None:
            raise ValueError("give either a Dask scheduler address or a worker count, not both")
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S)
        except OSError as err:
            raise BadInputError(address, f"no Dask scheduler answers there ({err})") from None
        log.info("using the Dask cluster at %s (%d workers)", address,
                 len(client.scheduler_info()["workers"]))
        with client:
            yield client
        return
    n = workers or usable_cores()
    if n < 1:
        raise ValueError(f"workers must be at least 1, got {n}")
    # No dashboard; the scheduler's small HTTP server (health checks) takes any free port
    # instead of 8787, which another cluster on the machine may hold.
    with dask.config.set({"distributed.admin.low-level-log-length": DEBUG_LOG_LENGTH}), \
            _quiet_logger("distributed", logging.ERROR):
        with _workers_ignore_ctrl_c():
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=None,
                                   scheduler_kwargs={"dashboard_address": ":0"},
                                   silence_logs=logging.CRITICAL)
        with cluster, Client(cluster) as client:
            log.info("started a local Dask cluster: %d worker processes", n)
            yield client
