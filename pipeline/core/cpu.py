"""CPU cores and threads: how many this process may use, and how many are free right now.

Torch runs each operator on a team of intra-op threads that meet at a barrier at its end.
When another process holds one of the cores, the team waits at every barrier for a thread
that has no core: the batch-1 SalMM forward, hundreds of small operators, went from 49 ms on
one thread to 200-380 ms on two beside one busy process on a 2-core machine. So the thread
count is chosen from what is actually free, and follows the load:

* :func:`usable_cores` - cores this process may run on (CPU affinity and the cgroup's CPU
  quota);
* :class:`ThreadGovernor` / :func:`adapt_threads` - called by the model at the start of
  every CPU forward (rate-limited to one look every :data:`INTERVAL_S`): measures over the
  time since the last look how much CPU *other* processes used on this process's cores
  (``/proc/stat`` minus this process's own ``/proc/self/stat`` time, so our own spinning
  threads do not count, our data or metric worker processes do) and sets torch's intra-op
  thread count to the cores left free, never above the count torch started with (which
  honours ``OMP_NUM_THREADS``). It lowers the count at once and raises it only when two looks
  in a row agree; it stops adapting when someone else calls ``torch.set_num_threads``;
* :func:`intra_op_threads` - a fixed count for a block, the governor standing down meanwhile
  (the CLIP cache pins one thread, so its numbers do not depend on the machine; a stream of a
  file shares the cores among its stages, one thread each);
* the trainer takes none of these: torch's reductions round differently with the thread
  count, so its count is fixed (one thread unless ``--threads``), never taken from the load.

Only Linux has ``/proc``; elsewhere the governor leaves the thread count alone.

:func:`reuse_freed_memory` is the other half of per-frame speed: glibc hands a freed
multi-megabyte block (a decoded 1280x720 frame is 2.7 MB) straight back to the kernel, so the
next frame's buffer costs ~700 page faults to fault in again; Dask's workers make it worse (their
``MALLOC_TRIM_THRESHOLD_`` is 64 KiB): a fifth of normalize's CPU time went to the kernel.
Keeping such blocks in the heap lets the next frame reuse them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

INTERVAL_S = 0.5
"""Seconds between two looks at the load."""
MARGIN = 0.25
"""A core counts as free when at most ``1 - MARGIN`` of it is used by others."""
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup v2 CPU quota
    (``cpu.max``) when one is set; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by this process's cgroup v2 ``cpu.max`` (quota / period), or None."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        group = line.split("::", 1)[1] if "::" in line else None
        if group is None:
            return None
        quota, period = Path("/sys/fs/cgroup", group.lstrip("/"), "cpu.max").read_text().split()
    except (OSError, IndexError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cpu_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks (all but idle and iowait) of the CPUs ``cpus`` since boot."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, rest.split()[:8])
        busy += user + nice + system + irq + softirq + steal
    return busy


def _running_elsewhere() -> int | None:
    """Threads of other processes running or runnable at this instant: the least of three
    looks (``procs_running`` of /proc/stat minus this process's threads in state R), so a
    short burst does not count and a busy process does."""
    counts = []
    for _ in range(3):
        try:
            stat = Path("/proc/stat").read_text()
            running = int(stat.partition("procs_running ")[2].split()[0])
            own = sum(1 for task in Path("/proc/self/task").iterdir()
                      if _task_state(task) == "R")
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, running - own))
        time.sleep(0.001)
    return min(counts)


def _task_state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "?"


def _own_ticks() -> int | None:
    """User + system clock ticks this process (all its threads) has used."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])       # utime, stime (fields 14, 15 of stat)


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the number of cores other processes leave free
    (see the module docstring). One per process: :func:`adapt_threads` uses a shared one."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._cpus: set[int] | None = None
        self._ceiling: int | None = None        # torch's own count when we first looked
        self._set: int | None = None            # what we last set (None: not yet)
        self._rising = 0                        # looks in a row that asked for more threads
        self._sample = self._take_sample()      # (time, busy ticks of our CPUs, own ticks)
        self.enabled = self._sample is not None

    def _take_sample(self) -> tuple[float, int, int] | None:
        if self._cpus is None:
            try:
                self._cpus = set(os.sched_getaffinity(0))
            except AttributeError:
                return None
        busy, own = _cpu_ticks(self._cpus), _own_ticks()
        if busy is None or own is None:
            return None
        return time.monotonic(), busy, own

    def _threads_for(self, free: float) -> int:
        return threads_for(free, self._ceiling or 1)

    def free_cores(self) -> float | None:
        """Cores of this process's affinity not used by other processes since the last call
        (None when the window is shorter than :attr:`interval_s`, or /proc is unreadable)."""
        if self._sample is None or time.monotonic() - self._sample[0] < self.interval_s:
            return None                         # nothing read: a forward costs no /proc reads
        now = self._take_sample()
        if now is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._sample, now
        self._sample = now
        others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / _TICKS / (t1 - t0))
        return len(self._cpus or ()) - others

    def adapt(self) -> int:
        """Look at the load (at most once per interval) and set torch's thread count; returns
        the count in effect."""
        import torch  # lazy: the core imports without torch

        with self._lock:
            current = torch.get_num_threads()
            if not self.enabled:
                return current
            if self._ceiling is None:
                self._ceiling = min(current, usable_cores())
            elif self._set is not None and current != self._set:
                self.enabled = False            # someone chose a count: theirs stands
                return current
            free = self.free_cores()
            if free is None and self._set is None:   # first look: what runs right now
                elsewhere = _running_elsewhere()
                free = None if elsewhere is None else len(self._cpus or ()) - elsewhere
            if free is None:
                return current
            wanted = self._threads_for(free)
            if wanted > current:
                self._rising += 1
                if self._rising < 2:
                    wanted = current
            else:
                self._rising = 0
            if wanted != current:
                torch.set_num_threads(wanted)
            self._set = wanted
            return wanted


def threads_for(free: float, ceiling: int) -> int:
    """Threads for ``free`` free cores: whole cores, a core counting as free when others use at
    most ``1 - MARGIN`` of it; between 1 and ``ceiling``."""
    return max(1, min(ceiling, math.floor(free + MARGIN)))


_governor: ThreadGovernor | None = ThreadGovernor()
_governor_pid = os.getpid()


def _process_governor() -> ThreadGovernor:
    """This process's governor (made at import; a forked child makes its own)."""
    global _governor, _governor_pid
    if _governor is None or _governor_pid != os.getpid():
        _governor, _governor_pid = ThreadGovernor(), os.getpid()
    return _governor


def adapt_threads() -> int:
    """:meth:`ThreadGovernor.adapt` of this process's governor. Importing this module starts
    its first measuring window."""
    return _process_governor().adapt()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters
_REUSING = {"pid": 0}


def reuse_freed_memory(block_mb: int = 64) -> bool:
    """Make glibc keep freed blocks of up to ``block_mb`` MiB in the heap (no mmap per block,
    no trim back to the kernel below 4x that), once per process; whether it could (glibc only).
    Results do not change, only where the memory comes from."""
    if _REUSING["pid"] == os.getpid():
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, block_mb << 20) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 4 * block_mb << 20) == 1)
    except (OSError, AttributeError):
        return False
    if ok:
        _REUSING["pid"] = os.getpid()
    return ok


def set_threads(count: int) -> None:
    """Fix torch's intra-op thread count at ``count`` for the rest of this process: the
    governor stands down (:func:`adapt_threads` changes nothing any more)."""
    import torch  # lazy: the core imports without torch

    _process_governor().enabled = False
    torch.set_num_threads(count)


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count fixed at ``count``: the governor stands
    down meanwhile (:func:`adapt_threads` changes nothing); the count and the governor are as
    they were after."""
    import torch  # lazy: the core imports without torch

    governor = _process_governor()
    enabled, before = governor.enabled, torch.get_num_threads()
    governor.enabled = False
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        governor.enabled = enabled
