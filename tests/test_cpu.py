"""The thread governor on a simulated machine: its decisions from given /proc readings."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline.core import cpu


class FakeMachine:
    """Two cores; ``others`` cores' worth of CPU used by other processes, ``own`` by us."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 100.0
        self.busy = 0          # busy ticks of our CPUs since boot
        self.own_ticks = 0
        self.elsewhere = 0     # threads of other processes running at this instant
        monkeypatch.setattr(cpu, "time", types.SimpleNamespace(
            monotonic=lambda: self.now, sleep=lambda s: None))
        self.reads = 0         # /proc/stat readings
        monkeypatch.setattr(cpu, "_cpu_ticks", self._cpu_ticks)
        monkeypatch.setattr(cpu, "_own_ticks", lambda: self.own_ticks)
        monkeypatch.setattr(cpu, "_running_elsewhere", lambda: self.elsewhere)
        monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setattr(cpu, "usable_cores", lambda: 2)

    def _cpu_ticks(self, cpus) -> int:
        self.reads += 1
        return self.busy

    def run(self, seconds: float, others: float, own: float) -> None:
        ticks = cpu._TICKS * seconds
        self.now += seconds
        self.busy += round(ticks * (others + own))
        self.own_ticks += round(ticks * own)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_free_cores_leaves_out_our_own_time(monkeypatch):
    machine = FakeMachine(monkeypatch)
    governor = cpu.ThreadGovernor()
    machine.run(0.1, others=1.0, own=1.0)
    assert governor.free_cores() is None                 # window shorter than the interval
    machine.run(1.0, others=1.0, own=2.0)                # our spinning threads don't count
    assert governor.free_cores() == pytest.approx(1.0, abs=0.05)
    machine.run(1.0, others=0.0, own=2.0)
    assert governor.free_cores() == pytest.approx(2.0, abs=0.05)


def test_a_busy_core_drops_to_one_thread_at_once_and_quiet_raises_after_two_looks(
        monkeypatch, two_threads):
    machine = FakeMachine(monkeypatch)
    governor = cpu.ThreadGovernor()
    machine.elsewhere = 1                                # a busy process when we first look
    assert governor.adapt() == 1 and torch.get_num_threads() == 1
    machine.run(1.0, others=1.0, own=1.0)
    assert governor.adapt() == 1
    machine.run(1.0, others=0.6, own=1.0)                # it is slowing down: still not free
    assert governor.adapt() == 1
    machine.run(1.0, others=0.0, own=1.0)                # quiet: one look is not enough
    assert governor.adapt() == 1
    machine.run(1.0, others=0.0, own=1.0)
    assert governor.adapt() == 2 and torch.get_num_threads() == 2
    machine.run(1.0, others=0.9, own=2.0)                # busy again: down at once
    assert governor.adapt() == 1


def test_quiet_machine_keeps_torch_count_and_calls_between_looks_change_nothing(
        monkeypatch, two_threads):
    machine = FakeMachine(monkeypatch)
    governor = cpu.ThreadGovernor()
    assert governor.adapt() == 2
    machine.run(0.2, others=2.0, own=0.0)                # inside the interval: not measured
    reads = machine.reads
    assert governor.adapt() == 2
    assert machine.reads == reads                        # nor read: a forward costs no /proc


def test_never_more_threads_than_torch_started_with(monkeypatch):
    machine = FakeMachine(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)                             # as OMP_NUM_THREADS=1 would
    try:
        governor = cpu.ThreadGovernor()
        for _ in range(4):
            machine.run(1.0, others=0.0, own=1.0)
            assert governor.adapt() == 1
    finally:
        torch.set_num_threads(before)


def test_a_count_someone_else_sets_is_left_alone(monkeypatch, two_threads):
    machine = FakeMachine(monkeypatch)
    governor = cpu.ThreadGovernor()
    assert governor.adapt() == 2
    torch.set_num_threads(1)                             # the user's own choice
    machine.run(1.0, others=0.0, own=1.0)
    assert governor.adapt() == 1
    machine.run(1.0, others=0.0, own=1.0)
    assert governor.adapt() == 1 and not governor.enabled


def test_intra_op_threads_sets_and_restores(two_threads):
    with cpu.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_usable_cores_is_at_least_one():
    assert cpu.usable_cores() >= 1
