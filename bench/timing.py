"""Side-by-side timing shared by the bench scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_side_by_side(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (min, median) seconds} of each ``step()``, the steps run in turn ``repeats`` times
    after one warm-up each, so they share the machine's load; the minimum is the least disturbed run."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}
