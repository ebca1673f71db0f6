"""dask_client: a local cluster sized as asked, or an existing cluster by address."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import PurePosixPath

import pytest
from distributed import LocalCluster

from pipeline.core import dask_cluster
from pipeline.core.cpu import usable_cores
from pipeline.core.dask_cluster import dask_client
from pipeline.core.errors import BadInputError


def test_local_cluster_has_single_threaded_worker_processes():
    with dask_client(workers=2) as client:
        threads = client.nthreads()
        assert sorted(threads.values()) == [1, 1]
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        assert len(pids) == 2 and __import__("os").getpid() not in pids
        cluster = client.cluster
    assert cluster.status.name == "closed"


def test_existing_cluster_is_used_and_left_running():
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"},
                      silence_logs=logging.ERROR) as cluster:
        with dask_client(address=cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
            assert client.scheduler.address == cluster.scheduler_address
        assert cluster.status.name == "running"


def test_unreachable_address_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT_S", 1)
    with (pytest.raises(BadInputError, match="^tcp://127.0.0.1:9: no Dask scheduler answers"),
          dask_client(address="tcp://127.0.0.1:9")):
        pass


def test_address_and_worker_count_are_exclusive():
    with pytest.raises(ValueError, match="not both"), dask_client(address="tcp://127.0.0.1:9",
                                                                   workers=2):
        pass


def test_usable_cores_is_positive():
    assert usable_cores() >= 1


def test_finished_tasks_leave_their_arguments_behind():
    """The local cluster's connections keep no copies of the messages they sent: a compute
    message carries its task's arguments, and Dask's default debug logs (1,000 messages per
    connection) kept every normalize frame submitted so far alive in the main process."""
    marker = "/salmm-test-marker"

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects()
                   if type(o) is PurePosixPath and str(o).startswith(marker))

    with dask_client(workers=1) as client:
        futures = [client.submit(len, [PurePosixPath(f"{marker}/{i}/{j}") for j in range(3)],
                                 pure=False) for i in range(40)]
        assert sum(f.result() for f in futures) == 120
        del futures
        deadline = time.monotonic() + 60
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
            assert time.monotonic() < deadline, "the scheduler never released the tasks"
            time.sleep(0.05)
        assert alive() == 0
