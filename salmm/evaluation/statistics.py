"""Statistics over an evaluation's per-frame rows: means over the defined frames, per-video means
and the best and worst videos, the spread of the random metrics over seeds, bootstrap intervals
over videos."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salmm.evaluation.scoring import SPREAD_METRICS


def finite_means(rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> dict[str, float]:
    """Per metric, the mean over the frames where it is not NaN (NaN if it is NaN on all)."""
    out = {}
    for m in metric_names:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[m] = float(values.mean()) if values.size else math.nan
    return out


def video_of(row: dict[str, Any]) -> str:
    """The video a row belongs to: its ``video`` field, else the folder of its name."""
    if row.get("video") is not None:
        return str(row["video"])
    return str(Path(row["name"]).parent)


def by_video(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each video (:func:`video_of`), videos in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(video_of(row), []).append(row)
    return groups


def per_video(rows: Sequence[dict[str, Any]], metric_names: Sequence[str]
              ) -> list[dict[str, Any]]:
    """One row per video in first-seen order: ``video``, ``frames`` and each metric's mean
    over the video's frames where it is defined (:func:`finite_means`)."""
    return [{"video": video, "frames": len(members), **finite_means(members, metric_names)}
            for video, members in by_video(rows).items()]


def ranked_videos(videos: Sequence[dict[str, Any]], metric: str = "CC", count: int = 3
                  ) -> dict[str, Any]:
    """Up to ``count`` best and ``count`` worst videos by ``metric`` (higher is better; NaN
    left out), never the same video in both: with fewer than 2 x ``count`` videos, the better
    half are the best and the rest the worst (worst first)."""
    scored = sorted((v for v in videos if not math.isnan(v[metric])),
                    key=lambda v: (-v[metric], v["video"]))
    pick = [{"video": v["video"], "frames": v["frames"], metric: v[metric]} for v in scored]
    best = min(count, (len(pick) + 1) // 2)
    return {"ranked_by": metric, "videos": len(videos), "best": pick[:best],
            "worst": pick[best:][::-1][:count]}


def seed_spread(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any] | None:
    """Per metric of :data:`SPREAD_METRICS`: the split's official mean under each seed, their
    mean and sample standard deviation; None with one seed (or no fixations)."""
    if len(seeds) < 2 or "spread" not in rows[0]:
        return None
    out = {}
    for m in SPREAD_METRICS:
        # each seed's mean exactly as metrics.aggregate takes the first one's
        per_seed = np.array([np.mean(np.array([r["spread"][m][k] for r in rows],
                                              dtype=np.float64)) for k in range(len(seeds))])
        out[m] = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)),
                  "per_seed": [float(v) for v in per_seed]}
    return {"seeds": list(seeds), "metrics": out}


BOOTSTRAP_LEVEL = 0.95


def bootstrap_intervals(rows: Sequence[dict[str, Any]], metric_names: Sequence[str],
                        replicates: int, seed: int) -> dict[str, Any]:
    """Percentile bootstrap over videos: ``replicates`` times, draw as many videos as the split
    has, with replacement, keep all their frames, and take each metric's mean over the drawn
    frames where it is defined; the 2.5th and 97.5th percentiles of those means are the 95%
    interval. Draws from a generator seeded by (``seed``, "bootstrap"), so the interval is
    reproducible."""
    members = list(by_video(rows).values())
    rng = np.random.default_rng([seed, int.from_bytes(b"bootstrap", "big")])
    draws = rng.integers(0, len(members), size=(replicates, len(members)))
    weights = np.stack([np.bincount(d, minlength=len(members)) for d in draws])   # [R, V]
    low, high = 100 * (1 - BOOTSTRAP_LEVEL) / 2, 100 * (1 + BOOTSTRAP_LEVEL) / 2
    out = {}
    for m in metric_names:
        values = [np.array([r[m] for r in group], dtype=np.float64) for group in members]
        sums = np.array([np.nansum(v) for v in values])
        counts = np.array([np.count_nonzero(~np.isnan(v)) for v in values])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ sums) / (weights @ counts)
        means = means[~np.isnan(means)]
        out[m] = ([float(np.percentile(means, low)), float(np.percentile(means, high))]
                  if means.size else None)
    return {"replicates": replicates, "unit": "video", "videos": len(members),
            "level": BOOTSTRAP_LEVEL, "method": "percentile", "intervals": out}
