"""SalMM forward and forward+backward under load: the default thread choice against one thread.

Run: ``python -m bench.threads [--repeats 15] [--size 256]``

Every configuration runs in a fresh interpreter that does what a user does
(``from salmm import build_model``, then calls the model), with the default thread count or
with ``OMP_NUM_THREADS=1``, on a quiet machine, beside one busy process and beside two (``python -c "while True: pass"``,
started before the interpreter and stopped after it; two fill a 2-core machine: the heavier
load where a governor that trusts a stale look would pick too many threads).
Rows: batch 1 and batch 8, forward under ``torch.inference_mode()`` and forward + backward;
the figure per row is the median of ``--repeats`` calls after two warm-up calls, and the ratio
default / one thread (goal <= 1.2 on every row: two threads never slower than one).

``--train``: also the trainer's own throughput, ``python -m salmm.train --cached-clip --workers
2`` (batch 8, 256x256, synthetic BDDA made with the real commands under ``--work``), as the
median training samples/s of epochs 2..N from its ``metrics.csv``, quiet and beside one busy
process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.2

CHILD = r"""
import json, sys, time
import torch
from salmm import build_model
size, repeats = int(sys.argv[1]), int(sys.argv[2])
model = build_model(cached_clip=True)
out = {"threads": torch.get_num_threads()}
for batch in (1, 8):
    x = torch.rand(batch, 3, size, size)
    emb = torch.randn(batch, 512)
    def forward():
        with torch.inference_mode():
            model(x, emb)
    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(x, emb).mean().backward()
    for name, step in (("forward", forward), ("forward+backward", forward_backward)):
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[f"batch {batch} {name}"] = times[2:]
out["threads_after"] = torch.get_num_threads()
print("RESULT " + json.dumps(out))
"""


class busy_process:
    """Context: ``busy`` (a bool counts as 0 or 1) ``while True: pass`` processes for its
    duration."""

    def __init__(self, busy: int) -> None:
        self.busy = int(busy)
        self.hogs: list[subprocess.Popen] = []

    def __enter__(self) -> None:
        self.hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(self.busy)]
        if self.hogs:
            time.sleep(1.0)                 # let the scheduler see them

    def __exit__(self, *exc: object) -> None:
        for hog in self.hogs:
            hog.kill()
            hog.wait()


def module(*args: str, cwd: Path | None = None) -> None:
    """``python -m <args>``; raises with its stderr on failure."""
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                            check=False, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")


def trainer_rate(work: Path, busy: bool, epochs: int) -> float:
    """Median training samples/s of epochs 2..N of ``salmm.train --workers 2`` on ``work``."""
    prepared = work / "prepared"
    if not (prepared / "manifest.json").exists():
        module("pipeline", "-q", "synth", "--dataset", "bdda", "--out", str(work / "raw"),
               "--videos", "3", "--frames", "160")
        module("pipeline", "-q", "normalize", "--dataset", "bdda", "--root", str(work / "raw"),
               "--out", str(prepared), "--shard-size", "16")
        module("pipeline", "-q", "embed", "--prepared", str(prepared), "--clip-pretrained",
               "none")
    run = work / f"run-{'busy' if busy else 'quiet'}-{time.time_ns()}"
    with busy_process(busy):
        module("salmm.train", "--cached-clip", "--prepared", str(prepared), "--out", str(run),
               "--epochs", str(epochs), "--batch-size", "8", "--workers", "2",
               "--clip-pretrained", "none")
    with open(run / "metrics.csv") as f:
        rates = [float(row["train_samples_per_s"]) for row in csv.DictReader(f)]
    return statistics.median(rates[1:])


def run_child(size: int, repeats: int, one_thread: bool, busy: int) -> dict:
    """Times of one fresh interpreter: {row: [seconds...], "threads": ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    with busy_process(busy):
        result = subprocess.run([sys.executable, "-c", CHILD, str(size), str(repeats)], env=env,
                                capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train", action="store_true", help="also time the trainer")
    parser.add_argument("--epochs", type=int, default=4, help="trainer epochs (with --train)")
    parser.add_argument("--work", type=Path, help="folder for the --train dataset (default:"
                        " temporary)")
    opts = parser.parse_args(argv)
    rows = ("batch 1 forward", "batch 1 forward+backward", "batch 8 forward",
            "batch 8 forward+backward")
    print(f"SalMM {opts.size}x{opts.size}, median of {opts.repeats} calls, ms"
          " (default threads / OMP_NUM_THREADS=1 = ratio; goal <= 1.2)")
    worst = 0.0
    for busy in (0, 1, 2):
        # alternate the two so drifting load hits both alike
        default = run_child(opts.size, opts.repeats, one_thread=False, busy=busy)
        single = run_child(opts.size, opts.repeats, one_thread=True, busy=busy)
        label = ("quiet machine", "beside one busy process", "beside two busy processes")[busy]
        print(f"\n{label}: default picked {default['threads']} -> {default['threads_after']}"
              " thread(s)")
        for row in rows:
            d, s = statistics.median(default[row]), statistics.median(single[row])
            worst = max(worst, d / s)
            print(f"  {row:26s} {1e3 * d:8.1f} / {1e3 * s:8.1f} = {d / s:5.2f}"
                  f"   (max {1e3 * max(default[row]):.0f} / {1e3 * max(single[row]):.0f})")
    if opts.train:
        with tempfile.TemporaryDirectory() as tmp:
            work = opts.work or Path(tmp)
            quiet, loaded = (trainer_rate(work, busy, opts.epochs) for busy in (False, True))
        print(f"\ntrainer, --workers 2, batch 8: {quiet:.1f} samples/s quiet,"
              f" {loaded:.1f} beside one busy process")
    print(f"\nthreads: worst ratio {worst:.2f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
