"""The reference predictors every driver-attention result is judged against.

* ``center`` - a centre-bias Gaussian: ``exp(-((y - cy)^2 / (2 sy^2) + (x - cx)^2 / (2 sx^2)))``
  centred on the frame, its widths ``sy``, ``sx`` (pixels at the prepared size) the second
  moments about the centre of the mean training label - a closed form, so the fit is
  deterministic;
* ``mean`` - the mean of the training split's labels (as stored: [0, 1] per pixel);
* ``uniform`` - a constant map, scored by :func:`salmm.evaluation.metrics.uniform_scores` (the official
  min-max normalisation makes a constant map NaN on every metric).

The fits read the labels of the prepared dataset's ``train`` split (shards checked against
the manifest as they are read) and are recorded - split, frames, data version, widths - in
every summary that uses them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.core.progress import progress
from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shards import decode_label
from salmm.data.stages import read_shards
from salmm.evaluation.options import BASELINES

log = logging.getLogger("salmm.evaluation.baselines")

FIT_SPLIT = "train"


@dataclass(frozen=True)
class Baseline:
    """A baseline predictor: its ``name``, the map it predicts for every frame (float64
    [H, W] in [0, 1] at the prepared size; None for ``uniform``) and what it was fitted on."""

    name: str
    map: np.ndarray | None
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} baseline"


def mean_label(data: PreparedDataset, split: str = FIT_SPLIT) -> tuple[np.ndarray, int]:
    """(mean label float64 [H, W], frames) of ``split``; BadInputError naming the manifest when
    the split is missing or empty."""
    if not data.samples(split):
        raise BadInputError(data.manifest_url, f"no {split!r} split to fit the baselines on"
                            " (center and mean need the training labels)")
    total = np.zeros(data.size, np.float64)
    frames = 0
    with progress(total=data.samples(split), unit="label",
                  desc=f"baseline fit ({split})") as bar:
        for sample in read_shards(data.shards(split)):
            total += decode_label(sample, data.size)
            frames += 1
            bar.update(1)
    return total / frames, frames


def centre_widths(mean: np.ndarray) -> tuple[float, float]:
    """(sy, sx) in pixels: the second moments of ``mean`` [H, W] (any non-negative map, not
    all zero) about the frame's centre ((H - 1) / 2, (W - 1) / 2)."""
    height, width = mean.shape
    weights = mean / mean.sum()
    ys = np.arange(height) - (height - 1) / 2
    xs = np.arange(width) - (width - 1) / 2
    sy = float(np.sqrt((weights.sum(1) * ys ** 2).sum()))
    sx = float(np.sqrt((weights.sum(0) * xs ** 2).sum()))
    return sy, sx


def centre_gaussian(shape: tuple[int, int], sy: float, sx: float) -> np.ndarray:
    """The centre-bias map float64 [H, W] with widths ``sy``, ``sx`` pixels; 1 at the centre."""
    height, width = shape
    ys = (np.arange(height) - (height - 1) / 2)[:, None]
    xs = (np.arange(width) - (width - 1) / 2)[None, :]
    return np.exp(-(ys ** 2 / (2 * sy ** 2) + xs ** 2 / (2 * sx ** 2)))


def fit_baseline(name: str, data: PreparedDataset) -> Baseline:
    """Baseline ``name`` (one of :data:`BASELINES`) for the prepared dataset."""
    if name not in BASELINES:
        raise BadInputError("--baseline", f"{name!r} is not one of {', '.join(BASELINES)}")
    if name == "uniform":
        return Baseline(name, None, {"fitted": False})
    mean, frames = mean_label(data)
    fit: dict[str, Any] = {"split": FIT_SPLIT, "frames": frames, "version_id": data.version}
    if not mean.any():
        raise BadInputError(data.manifest_url, f"every {FIT_SPLIT!r} label"
                            " is zero: no baseline can be fitted")
    if name == "mean":
        return Baseline(name, mean, fit)
    sy, sx = centre_widths(mean)
    height, width = mean.shape
    fit.update({"sigma_y_px": sy, "sigma_x_px": sx, "sigma_y_fraction": sy / height,
                "sigma_x_fraction": sx / width, "size": {"height": height, "width": width},
                "method": "second moments of the mean training label about the centre"})
    log.info("center baseline: sigma %.1f x %.1f px (%.3f x %.3f of the frame), from %d %s"
             " labels", sx, sy, sx / width, sy / height, frames, FIT_SPLIT)
    return Baseline(name, centre_gaussian(mean.shape, sy, sx), fit)
