"""Speed of the vectorised metrics against their plain loop references, side by side.

Run: ``python -m bench.metrics [--repeats 9] [--fixations 50]``

Workloads are the evaluation's: a 720x1280 fixation map with ``--fixations`` fixated pixels,
and a saliency map at that size (the model's 256x256 output enlarged, as AUC-Judd and
AUC-Borji see it). Two map kinds: "smooth" (Gaussian blobs with the fixations on them, like a
real prediction) and "noise" (uniform random values, the worst case for the binned count of
AUC-Judd), plus one AUC-Judd row with ten times the fixations (the reference makes one pass
over the map per fixation, the fast path one pass in all). Fast and reference calls alternate within each repeat and the medians are
compared, so load from other processes hits both alike. Also times ``imresize`` 256x256 ->
720x1280 against its loop-built-matrix reference, and one whole ``evaluate_frame``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np

from salmm.evaluation import metrics as M
from salmm.evaluation.imresize import imresize, imresize_reference

log = logging.getLogger("bench.metrics")


def smooth_frame(rng: np.random.Generator, n_fix: int):
    """(pred 256x256, label 256x256, fixations [n_fix, 2] on 720x1280) with shared hot spots."""
    rows, cols = np.mgrid[0:256, 0:256]
    centres = rng.uniform(40, 216, size=(3, 2))
    pred = sum(np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 25.0**2)) for r, c in centres)
    label = sum(
        np.exp(-((rows - r - 5) ** 2 + (cols - c) ** 2) / (2 * 15.0**2)) for r, c in centres
    )
    pick = centres[rng.integers(0, 3, n_fix)] * [720 / 256, 1280 / 256]
    fixations = (pick + rng.normal(0, 30, (n_fix, 2))).round().astype(int)
    fixations = np.clip(fixations, 0, [719, 1279])
    return pred.astype(np.float32), label.astype(np.float32), fixations


def paired_medians(fast, ref, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fast()`` and ``ref()``, alternated, after one warm-up each."""
    fast()
    ref()
    t_fast, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((fast, t_fast), (ref, t_ref)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_fast), statistics.median(t_ref)


def report(title: str, fast_s: float, ref_s: float) -> None:
    log.info(
        "%-44s fast %8.2f ms | reference %8.2f ms | reference/fast %6.1fx",
        title,
        fast_s * 1e3,
        ref_s * 1e3,
        ref_s / fast_s,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--fixations", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    n = args.fixations

    pred, label, fixations = smooth_frame(rng, n)
    fix = M.fixation_map(fixations)
    maps = {
        "smooth": M.minmax_normalize(imresize(M.minmax_normalize(pred), M.FIXATION_SHAPE)),
        "noise": rng.random(M.FIXATION_SHAPE),
    }
    log.info(
        "720x1280 maps, %d fixated pixels, median of %d paired runs", int(fix.sum()), args.repeats
    )

    for kind, sal in maps.items():
        for jitter in (True, False):
            fast_s, ref_s = paired_medians(
                lambda s=sal, j=jitter: M.auc_judd(s, fix, rng=rng, jitter=j),
                lambda s=sal, j=jitter: M.auc_judd_reference(s, fix, rng=rng, jitter=j),
                args.repeats,
            )
            report(f"AUC-Judd, {kind} map, jitter {'on' if jitter else 'off'}", fast_s, ref_s)
    many = M.fixation_map(
        np.stack([rng.integers(0, 720, 10 * n), rng.integers(0, 1280, 10 * n)], 1)
    )
    fast_s, ref_s = paired_medians(
        lambda: M.auc_judd(maps["noise"], many, rng=rng),
        lambda: M.auc_judd_reference(maps["noise"], many, rng=rng),
        args.repeats,
    )
    report(f"AUC-Judd, noise map, jitter on, {int(many.sum())} fixated", fast_s, ref_s)
    for kind, sal in maps.items():
        fast_s, ref_s = paired_medians(
            lambda s=sal: M.auc_borji(s, fix, rng=rng),
            lambda s=sal: M.auc_borji_reference(s, fix, rng=rng),
            args.repeats,
        )
        report(f"AUC-Borji, {kind} map, 100 splits", fast_s, ref_s)

    fast_s, ref_s = paired_medians(
        lambda: imresize(pred, M.FIXATION_SHAPE),
        lambda: imresize_reference(pred, M.FIXATION_SHAPE),
        args.repeats,
    )
    report("imresize bicubic 256x256 -> 720x1280", fast_s, ref_s)

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        M.evaluate_frame(pred, label, fixations, rng=rng)
        times.append(time.perf_counter() - start)
    log.info(
        "evaluate_frame (all six metrics, 256x256 maps): %.1f ms", statistics.median(times) * 1e3
    )


if __name__ == "__main__":
    main()
