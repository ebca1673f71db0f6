"""Fixation-label speed and agreement: the published recipe against the fast path, side by side.

    python -m bench.labels [--root RAW --dataset trafficgaze] [--frames 40] [--size 256 256]
                           [--repeat 50]

For a sample of frames (by default from a SYNTHETIC TrafficGaze dataset made in a temporary
folder; ``--root`` uses a real download), it times per frame

* reference: :func:`pipeline.formats.labels.fixation_label_reference` (720x1280 map, Gaussian blur
  sigma 40, cubic resize, min-max), once per frame;
* fast: :func:`pipeline.formats.labels.fixation_label` (per-point separable factors), ``--repeat``
  times per frame, after the one-off operator build (reported separately);

alternating frame by frame so machine load hits both alike, and prints the median ms/frame
of each (robust to load spikes from other processes), their ratio, and the largest absolute
difference between the two labels over the sample.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.datasets import read_frames
from pipeline.datasets.spec import FRAME_SIZE
from pipeline.datasets.splits import SPLITS
from pipeline.datasets.synthetic import write_dataset
from pipeline.formats.labels import fixation_label, fixation_label_reference, label_operators

log = logging.getLogger("bench.labels")


def sample_fixations(dataset: str, root: Path, count: int) -> list[np.ndarray]:
    """Fixations of ``count`` frames spread evenly over all splits of a raw dataset."""
    frames = [f for split in SPLITS if (root / f"{split}.json").exists()
              for f in read_frames(dataset, root, split)]
    if not frames:
        raise SystemExit(f"{root}: no frames listed in the split files")
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return [frames[i].fixations for i in picks]


def measure(samples: list[np.ndarray], size: tuple[int, int], repeat: int
            ) -> tuple[list[float], list[float], float]:
    """Per-frame seconds of the reference and the fast path, and the max abs difference."""
    reference_s, fast_s, worst = [], [], 0.0
    for points in samples:
        start = time.perf_counter()
        reference = fixation_label_reference(points, size)
        reference_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(repeat):
            fast = fixation_label(points, size)
        fast_s.append((time.perf_counter() - start) / repeat)
        worst = max(worst, float(np.abs(fast - reference).max()))
    return reference_s, fast_s, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="raw dataset root (default: a synthetic TrafficGaze dataset)")
    parser.add_argument("--dataset", choices=("trafficgaze", "drfixd-rainy"), default="trafficgaze")
    parser.add_argument("--frames", type=int, default=40, help="frames in the sample")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256),
                        metavar=("HEIGHT", "WIDTH"), help="label size")
    parser.add_argument("--repeat", type=int, default=50, help="fast-path runs per frame")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("pipeline").setLevel(logging.ERROR)  # the summary says SYNTHETIC
    size = tuple(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = write_dataset(args.dataset, Path(tmp) / "raw", videos=4, frames=20, seed=0)
        samples = sample_fixations(args.dataset, root, args.frames)

    start = time.perf_counter()
    label_operators(FRAME_SIZE, size)
    build_s = time.perf_counter() - start
    reference_s, fast_s, worst = measure(samples, size, args.repeat)

    counts = [len(points) for points in samples]
    reference_ms, fast_ms = 1e3 * statistics.median(reference_s), 1e3 * statistics.median(fast_s)
    source = "SYNTHETIC" if args.root is None else str(args.root)
    log.info("%s %s: %d frames, %d..%d fixations (%d with none), label %dx%d",
             source, args.dataset, len(samples), min(counts), max(counts), counts.count(0), *size)
    log.info("reference : %9.3f ms/frame (median)", reference_ms)
    log.info("fast      : %9.3f ms/frame (median; one-off operator build %.0f ms)",
             fast_ms, 1e3 * build_s)
    log.info("ratio     : %9.0f x", reference_ms / fast_ms)
    log.info("max |fast - reference| over the sample: %.2e", worst)


if __name__ == "__main__":
    main()
