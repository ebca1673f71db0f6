"""A benchmark's own metrics, beside the six of the SalM² MATLAB loops (:mod:`.metrics`).

**DR(eye)VE** reports CC, KLD and information gain as its authors' Python computes them
(``ndrplz/dreyeve``, ``experiments/metrics/metrics.py`` and ``compute_metrics.py``), which
differs from the MIT-benchmark MATLAB functions the SalM² loops call:

=========  ===================================================================================
CC         float32; both maps min-max normalised, standardised with the population standard
           deviation plus float32 ``eps``, then Pearson's r (``np.corrcoef``); NaN for a
           constant map. The MATLAB ``CC`` uses the sample deviation: r is the same up to eps.
KLD        float32; ``P = pred / (eps + sum pred)``, ``Q = gt / (eps + sum gt)`` with float32
           ``eps`` (1.19e-7, not MATLAB's 2.2e-16), ``sum Q log(eps + Q / (eps + P))``; the
           ground truth as its 0..255 grey levels, as the script reads the PNG.
IG         information gain over a baseline, in bits: prediction and baseline min-max
           normalised and made distributions, ``mean(log2(eps + P) - log2(eps + B))`` at the
           pixels where the fixation map is positive. The baseline is the mean training
           ground truth (the script's ``dreyeve_mean_train_gt_fix.png``): here the mean of the
           prepared train split's labels. None of the SalM² metrics is IG.
=========  ===================================================================================

Means as the scripts take them: ``np.nanmean`` over a sequence's frames, then the plain mean
over sequences (so a sequence weighs the same whatever its frame count).

**What differs here, and why.** The scripts score 1920x1080 maps (the prediction resized up
with ``cv2.resize``, bilinear); a prepared dataset holds its labels at the model's size, so these
are scored at that size (256x256 by default): the raw videos are not re-read to evaluate. The
ground truth is the one the prepared dataset was made from (``saliency_fix`` by default, the
scripts' ``*_WRT_FIX`` columns; ``--ground-truth saliency`` gives their ``*_WRT_SAL`` CC and
KLD, and an IG over the saliency map's positive pixels, which the scripts do not report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
"""float32 ``eps``, the DR(eye)VE scripts' ``np.finfo(np.float32).eps``."""


def _minmax32(x: np.ndarray) -> np.ndarray:
    """float32 map scaled to [0, 1] (all zeros for a constant map, as ``cv2.normalize``)."""
    x = np.asarray(x, dtype=np.float32)
    low, high = x.min(), x.max()
    if high == low:
        return np.zeros_like(x)
    return (x - low) / (high - low)


def dreyeve_cc(pred: np.ndarray, gt: np.ndarray) -> float:
    """DR(eye)VE's CC of a prediction and a ground-truth map of one shape (any scale)."""
    p, g = _minmax32(pred).ravel(), _minmax32(gt).ravel()
    p = (p - p.mean()) / (EPS32 + p.std())
    g = (g - g.mean()) / (EPS32 + g.std())
    if not p.any() or not g.any():
        return math.nan                     # a constant map: np.corrcoef's 0/0
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    p64 -= p64.mean()
    g64 -= g64.mean()
    return float((p64 @ g64) / math.sqrt((p64 @ p64) * (g64 @ g64)))


def dreyeve_kld(pred: np.ndarray, gt: np.ndarray) -> float:
    """DR(eye)VE's KL divergence of the ground truth ``gt`` from the prediction (float32)."""
    p = np.asarray(pred, dtype=np.float32)
    q = np.asarray(gt, dtype=np.float32)
    p = p / np.float32(EPS32 + p.sum(dtype=np.float32))
    q = q / np.float32(EPS32 + q.sum(dtype=np.float32))
    return float(np.sum(q * np.log(np.float32(EPS32) + q / (np.float32(EPS32) + p)),
                        dtype=np.float32))


def dreyeve_ig(pred: np.ndarray, fixated: np.ndarray, base: np.ndarray) -> float:
    """DR(eye)VE's information gain (bits) of ``pred`` over ``base`` at the pixels where
    ``fixated`` is positive; NaN when there are none (the mean of nothing) or when ``pred`` or
    ``base`` is constant (the script divides by its zero range)."""
    mask = np.asarray(fixated) > 0
    if not mask.any():
        return math.nan

    def distribution(x: np.ndarray) -> np.ndarray | None:
        x = np.asarray(x, dtype=np.float32)
        x = x - x.min()
        if not x.max() > 0:
            return None                     # the script's 0 / 0: NaN everywhere
        x = x / x.max()
        return x / np.float32(EPS32 + x.sum(dtype=np.float32))

    p, b = distribution(pred), distribution(base)
    if p is None or b is None:
        return math.nan
    gain = np.log2(np.float32(EPS32) + p[mask]) - np.log2(np.float32(EPS32) + b[mask])
    return float(np.mean(gain, dtype=np.float32))


@dataclass(frozen=True)
class Protocol:
    """A benchmark's metric set: ``name`` (as tables title it), ``metrics`` (column order),
    ``score(pred, label, base) -> {metric: value}`` per frame (``label`` in [0, 1] as the
    prepared dataset stores it, ``base`` the mean training label), and a one-line ``source``."""

    name: str
    metrics: tuple[str, ...]
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]
    source: str


def _dreyeve_frame(pred: np.ndarray, label: np.ndarray, base: np.ndarray) -> dict[str, float]:
    gt = np.round(np.asarray(label, dtype=np.float64) * 255)     # the PNG's grey levels
    return {"CC": dreyeve_cc(pred, gt), "KLD": dreyeve_kld(pred, gt),
            "IG": dreyeve_ig(pred, gt, base)}


PROTOCOLS: dict[str, Protocol] = {
    "dreyeve": Protocol(
        "DR(eye)VE protocol", ("CC", "KLD", "IG"), _dreyeve_frame,
        "ndrplz/dreyeve experiments/metrics (Palazzi et al., TPAMI 2018): float32 CC and KLD,"
        " IG over the mean training ground truth, nanmean per sequence then mean over"
        " sequences; scored at the prepared size, not 1920x1080"),
}
"""The datasets whose benchmark has metrics of its own (salmm.evaluation.protocols)."""


def aggregate(rows: Iterable[Mapping[str, object]], protocol: Protocol) -> dict[str, float]:
    """The protocol's means: per video ``nanmean`` over frames (NaN when a video has none
    defined), then the mean over videos that have one. ``rows``: per frame, ``video`` and
    ``protocol`` ({metric: value})."""
    by_video: dict[object, list[Mapping[str, float]]] = {}
    for row in rows:
        by_video.setdefault(row["video"], []).append(row["protocol"])
    means = {}
    for metric in protocol.metrics:
        per_video = []
        for frames in by_video.values():
            values = [v[metric] for v in frames if not math.isnan(v[metric])]
            if values:
                per_video.append(float(np.mean(values)))
        means[metric] = float(np.mean(per_video)) if per_video else math.nan
    return means
