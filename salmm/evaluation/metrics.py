"""The six saliency metrics SalM² reports, computed as the MIT saliency benchmark MATLAB code.

The paper's numbers come from the authors' MATLAB scripts (``metrics/calcForDataset`` in their
release), which call the MIT benchmark functions ``AUC_Borji``, ``AUC_Judd``, ``NSS``, ``CC``,
``similarity`` and ``KLdiv``. Each function here reproduces one of them in float64, with
MATLAB's ``eps`` (2.2204e-16), sample standard deviations (N - 1), MATLAB ``imresize`` (see
:mod:`salmm.evaluation.imresize`) and the same NaN outcomes:

=========  ===============================================================================
AUC_B      :func:`auc_borji`  — ROC area against ``n_splits`` sets of uniformly sampled pixels
AUC_J      :func:`auc_judd`   — ROC area against all non-fixated pixels, optional 1e-7 jitter
NSS        :func:`nss`        — mean of the standardised map at fixated pixels
CC         :func:`cc`         — Pearson correlation of two maps
SIM        :func:`similarity` — histogram intersection of two maps normalised to sum 1
KLD        :func:`kl_divergence` — KL divergence of the label from the prediction
=========  ===============================================================================

Randomness: MATLAB draws with ``rand``/``randi``; here every draw comes from a numpy
``Generator`` passed by the caller, in a documented order, so runs are reproducible and the
tests can hand the very same numbers to the MATLAB code (under GNU Octave) to compare
exactly. ``auc_judd_reference`` and ``auc_borji_reference`` are plain loop transcriptions kept
beside the vectorised functions; the tests check that they agree.

Per-dataset evaluation (:func:`evaluate_frame`, :func:`aggregate`) follows the official
``calcForTrafficGaze.m`` / ``calcForDrFixDrainy.m`` / ``calcForBDDA.m`` loops.

Checked against the official ``.m`` files under GNU Octave (``tests/test_metrics_octave.py``):
all six agree to about 1e-13 or better, jitter and random splits included. Known residual
differences from MATLAB itself: sums run in another order (last-bit differences, around
1e-13 at worst on 720x1280 maps); AUC-Borji's thresholds ``0:0.1:max`` are built as Octave
builds ranges, which may differ from MATLAB's colon by 1 ulp in the upper half of the range
(see :func:`borji_thresholds`); and a negative resized prediction gives NaN from
:func:`kl_divergence` where MATLAB's ``log`` goes complex (impossible in the official loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from salmm.evaluation.imresize import imresize

#: MATLAB's ``eps``: the spacing of doubles at 1.0.
EPS = float(np.finfo(np.float64).eps)

#: Size of the fixation map the official scripts build from raw fixation points (rows, cols).
FIXATION_SHAPE = (720, 1280)

#: Metric names in the column order of the paper's tables.
METRIC_ORDER = ("AUC_B", "AUC_J", "NSS", "CC", "SIM", "KLD")

#: Relative tolerance of the range rule in :func:`borji_thresholds` (GNU Octave's colon rule).
_RANGE_TOL = 3 * EPS


def _as_map(name: str, array: np.ndarray) -> np.ndarray:
    """A 2-D float64 copy of ``array`` that is all finite or all NaN; ValueError otherwise.

    All-NaN is what min-max normalising a constant map gives in the official loop; the
    metrics turn it into a NaN score as MATLAB does. Partly-NaN or infinite maps are errors.
    """
    out = np.array(array, dtype=np.float64)
    if out.ndim != 2 or out.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D map, got shape {out.shape}")
    finite = np.isfinite(out)
    if not (np.all(finite) or np.all(np.isnan(out))):
        raise ValueError(f"{name}: map contains inf or some (not all) NaN values")
    return out


def _resize_to(saliency_map: np.ndarray, shape: tuple[int, ...], method: str = "bicubic"):
    """MATLAB's ``imresize(map, size(other))`` as the metric files call it."""
    if saliency_map.shape == shape:
        return saliency_map
    return imresize(saliency_map, shape, method)


def minmax_normalize(saliency_map: np.ndarray) -> np.ndarray:
    """``(m - min) / (max - min)`` in float64, as the official loops do to every map.

    A constant map gives all-NaN (0/0), exactly like MATLAB; the metrics then return NaN.
    """
    m = np.asarray(saliency_map, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m - m.min()) / (m.max() - m.min())


def fixation_map(points: np.ndarray | Sequence[Sequence[int]], shape=FIXATION_SHAPE) -> np.ndarray:
    """Binary fixation map [shape] float64 from 0-based integer (row, col) points [N, 2].

    Points outside the map are dropped and repeated points count once, as in the official
    loops (which keep 1-based rows 1..720 and columns 1..1280 of the raw ``fixdata``; subtract 1
    from raw ``fixdata`` columns 4 (row) and 3 (col) to get these points).
    """
    pts = np.asarray(points)
    if pts.size == 0:
        return np.zeros(shape)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"fixations: expected an [N, 2] array of (row, col), got {pts.shape}")
    if not np.issubdtype(pts.dtype, np.integer):
        raise ValueError(f"fixations: expected integer pixel indices, got dtype {pts.dtype}")
    rows, cols = pts[:, 0], pts[:, 1]
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    fmap = np.zeros(shape)
    fmap[rows[inside], cols[inside]] = 1.0
    return fmap


# --------------------------------------------------------------------------- AUC-Judd


def _judd_prepare(saliency_map, fixation_map_, rng, jitter):
    """Shared prologue of AUC_Judd.m: resize, jitter, normalise. None means 'score is NaN'."""
    sal = _as_map("saliency_map", saliency_map)
    fix = _as_map("fixation_map", fixation_map_)
    if not np.any(fix):
        return None
    sal = _resize_to(sal, fix.shape)
    if jitter:
        if rng is None:
            raise ValueError("auc_judd: jitter=True needs rng (a numpy Generator)")
        sal = sal + rng.random(fix.shape) / 10000000
    sal = minmax_normalize(sal)
    if np.all(np.isnan(sal)):
        return None
    return sal.ravel(), fix.ravel() > 0


def _trapz(x: np.ndarray, y: np.ndarray) -> float:
    """MATLAB ``trapz(x, y)`` for vectors: ``diff(x)' * (y(1:end-1) + y(2:end)) / 2``."""
    return float(np.dot(np.diff(x), y[:-1] + y[1:]) / 2)


def auc_judd(
    saliency_map: np.ndarray,
    fixation_map: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    jitter: bool = True,
) -> float:
    """AUC-Judd (``AUC_Judd.m``), vectorised. Returns a float in [0, 1], or NaN.

    ``saliency_map`` [h, w] (resized bicubically to the fixation map's size if different);
    ``fixation_map`` [H, W], fixated where > 0. With ``jitter`` the map gets
    ``rng.random((H, W)) / 1e7`` added (one draw, row-major, like MATLAB's
    ``rand(size)/10000000``) to break ties; ``jitter=False`` skips it and needs no ``rng``.
    NaN when there are no fixations or the map is constant (without jitter).

    Every fixated pixel's value is a threshold, and the ROC needs, for each, the number of
    pixels at or above it. Instead of one pass over the map per threshold, pixels are binned
    by ``floor(value * 65535)`` (monotone in the value): pixels in a bin holding no threshold
    are counted from cumulative bin counts; the few that share a bin with a threshold are
    sorted and counted with ``searchsorted``. Exact, including ties.
    """
    prepared = _judd_prepare(saliency_map, fixation_map, rng, jitter)
    if prepared is None:
        return math.nan
    s, fixated = prepared
    thresholds = np.sort(s[fixated])[::-1]  # descending, as the ROC sweep visits them
    n_fix, n_pix = thresholds.size, s.size
    at_or_above = _count_at_or_above(s, thresholds)
    i = np.arange(1, n_fix + 1)
    tp = np.concatenate([[0.0], i / n_fix, [1.0]])
    fp = np.concatenate([[0.0], (at_or_above - i) / (n_pix - n_fix), [1.0]])
    return _trapz(fp, tp)


_N_BINS = 1 << 16


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[sum(values >= t) for t in thresholds]`` for ``values`` in [0, 1], int64 [len(thresholds)]."""
    top = _N_BINS - 1
    # Rounding the product and truncating are both monotone: t <= v implies bin(t) <= bin(v).
    bins = (values * top).astype(np.int32)
    threshold_bins = (thresholds * top).astype(np.int32)
    shared = np.zeros(_N_BINS, dtype=bool)
    shared[threshold_bins] = True
    counts = np.bincount(bins, minlength=_N_BINS)
    counts[shared] = 0
    # A pixel outside every threshold's bin is >= t exactly when its bin is above t's bin.
    above_bin = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])[threshold_bins + 1]
    near = np.sort(values[shared[bins]])
    return above_bin + near.size - np.searchsorted(near, thresholds, side="left")


def auc_judd_reference(
    saliency_map: np.ndarray,
    fixation_map: np.ndarray,
    *,
    rng: np.random.Generator | None = None,
    jitter: bool = True,
) -> float:
    """Plain loop transcription of ``AUC_Judd.m``; same contract and draws as :func:`auc_judd`."""
    prepared = _judd_prepare(saliency_map, fixation_map, rng, jitter)
    if prepared is None:
        return math.nan
    s, fixated = prepared
    all_thresholds = np.sort(s[fixated])[::-1]
    n_fix, n_pix = all_thresholds.size, s.size
    tp = np.zeros(n_fix + 2)
    fp = np.zeros(n_fix + 2)
    tp[-1] = 1.0
    fp[-1] = 1.0
    for i in range(1, n_fix + 1):
        thresh = all_thresholds[i - 1]
        above = np.sum(s >= thresh)
        tp[i] = i / n_fix
        fp[i] = (above - i) / (n_pix - n_fix)
    return _trapz(fp, tp)


# --------------------------------------------------------------------------- AUC-Borji


def borji_thresholds(limit: float, step: float) -> np.ndarray:
    """The range ``0:step:limit`` as GNU Octave builds it, ascending, float64.

    Elements are ``k * step``; the count allows ``limit`` to fall a relative 3 eps short of
    the last multiple, and that last element is then clipped to ``limit``. (MATLAB's colon
    computes the upper half of a range backwards from its end, so its thresholds can differ
    in the last bit; that only matters for a saliency value within 1 ulp of a multiple of
    ``step``.)
    """
    count = math.floor(limit / step) + 1
    while (count - 1) * step > limit * (1 + _RANGE_TOL):
        count -= 1
    while count * step <= limit * (1 + _RANGE_TOL):
        count += 1
    values = np.arange(count) * step
    values[-1] = min(values[-1], limit)
    return values


def _borji_prepare(saliency_map, fixation_map_):
    """Shared prologue of AUC_Borji.m: resize, normalise. None means 'score is NaN'."""
    sal = _as_map("saliency_map", saliency_map)
    fix = _as_map("fixation_map", fixation_map_)
    if np.sum(fix > 0) <= 1:
        return None
    sal = _resize_to(sal, fix.shape)
    sal = minmax_normalize(sal)
    if np.all(np.isnan(sal)):
        return None
    s = sal.ravel()
    return s, s[fix.ravel() > 0]


def _borji_samples(rng, n_pixels: int, n_fix: int, n_splits: int) -> np.ndarray:
    if rng is None:
        raise ValueError("auc_borji: rng (a numpy Generator) is required for the random splits")
    return rng.integers(0, n_pixels, size=(n_fix, n_splits))


def auc_borji(
    saliency_map: np.ndarray,
    fixation_map: np.ndarray,
    *,
    rng: np.random.Generator,
    n_splits: int = 100,
    step_size: float = 0.1,
) -> float:
    """AUC-Borji (``AUC_Borji.m``), vectorised over splits and thresholds. In [0, 1] or NaN.

    ``saliency_map`` [h, w] (resized bicubically to the fixation map's size if different);
    ``fixation_map`` [H, W], fixated where > 0. Negatives are ``n_fix`` pixels drawn uniformly
    with replacement from the whole map, per split: one draw
    ``rng.integers(0, H*W, size=(n_fix, n_splits))`` of row-major flat indices (column ``s``
    is split ``s``). Thresholds are ``0:step_size:max`` (see :func:`borji_thresholds`) with
    ``max`` over the split's fixated and sampled values. The score is the mean ROC area over
    the splits. NaN with fewer than two fixated pixels or a constant map.
    """
    prepared = _borji_prepare(saliency_map, fixation_map)
    if prepared is None:
        return math.nan
    s, positives = prepared
    n_fix = positives.size
    negatives = s[_borji_samples(rng, s.size, n_fix, n_splits)]  # [n_fix, n_splits]
    split_max = np.maximum(positives.max(), negatives.max(axis=0))  # [n_splits]
    ranges = [borji_thresholds(float(m), step_size) for m in split_max]
    width = max(r.size for r in ranges)
    # Thresholds [n_splits, width], descending; +inf pads shorter splits, counting 0 above it,
    # which adds (0, 0) points to the ROC curve and no area.
    thresholds = np.full((n_splits, width), np.inf)
    for k, r in enumerate(ranges):
        thresholds[k, width - r.size :] = r[::-1]
    tp = (positives[:, None, None] >= thresholds[None]).sum(axis=0) / n_fix
    fp = (negatives[:, :, None] >= thresholds[None]).sum(axis=0) / n_fix
    zeros, ones = np.zeros((n_splits, 1)), np.ones((n_splits, 1))
    tp = np.concatenate([zeros, tp, ones], axis=1)
    fp = np.concatenate([zeros, fp, ones], axis=1)
    areas = np.einsum("sk,sk->s", np.diff(fp, axis=1), tp[:, :-1] + tp[:, 1:]) / 2
    return float(np.mean(areas))


def auc_borji_reference(
    saliency_map: np.ndarray,
    fixation_map: np.ndarray,
    *,
    rng: np.random.Generator,
    n_splits: int = 100,
    step_size: float = 0.1,
) -> float:
    """Plain loop transcription of ``AUC_Borji.m``; same contract and draws as :func:`auc_borji`."""
    prepared = _borji_prepare(saliency_map, fixation_map)
    if prepared is None:
        return math.nan
    s, positives = prepared
    n_fix = positives.size
    random_fix = s[_borji_samples(rng, s.size, n_fix, n_splits)]
    auc = np.full(n_splits, np.nan)
    for split in range(n_splits):
        current = random_fix[:, split]
        limit = float(max(positives.max(), current.max()))
        all_thresholds = borji_thresholds(limit, step_size)[::-1]
        tp = np.zeros(all_thresholds.size + 2)
        fp = np.zeros(all_thresholds.size + 2)
        tp[-1] = 1.0
        fp[-1] = 1.0
        for i, thresh in enumerate(all_thresholds, start=1):
            tp[i] = np.sum(positives >= thresh) / n_fix
            fp[i] = np.sum(current >= thresh) / n_fix
        auc[split] = _trapz(fp, tp)
    return float(np.mean(auc))


# --------------------------------------------------------------------------- NSS, CC, SIM, KLD


def nss(saliency_map: np.ndarray, fixation_map: np.ndarray) -> float:
    """Normalised scanpath saliency (``NSS.m``, averaged as the official loop does).

    The map [h, w] is resized to the fixation map [H, W] with **nearest neighbour**,
    standardised with its mean and sample std (N - 1), and averaged over the fixated pixels
    (each pixel once). NaN if there are no fixations or the map is constant.
    """
    sal = _as_map("saliency_map", saliency_map)
    fix = _as_map("fixation_map", fixation_map)
    sal = _resize_to(sal, fix.shape, "nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        standardised = (sal - sal.mean()) / sal.std(ddof=1)
    values = standardised[fix > 0]
    return float(values.mean()) if values.size else math.nan


def _corr2(a: np.ndarray, b: np.ndarray) -> float:
    """MATLAB ``corr2``: Pearson correlation of two equal-size matrices."""
    a = a - a.mean()
    b = b - b.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def cc(saliency_map: np.ndarray, label: np.ndarray) -> float:
    """Linear correlation coefficient (``CC.m``), in [-1, 1] or NaN for a constant map.

    ``saliency_map`` [h, w] is resized bicubically to ``label`` [H, W]; both are standardised
    (sample std) and correlated with ``corr2``.
    """
    map2 = _as_map("label", label)
    map1 = _resize_to(_as_map("saliency_map", saliency_map), map2.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        map1 = (map1 - map1.mean()) / map1.std(ddof=1)
        map2 = (map2 - map2.mean()) / map2.std(ddof=1)
    return _corr2(map2, map1)


def _distribution(m: np.ndarray, *, rescale: bool) -> np.ndarray:
    """Normalise to sum 1 (after min-max if ``rescale``); an all-zero map stays all zero.

    "All zero" is MATLAB's ``~any(m(:))``, which ignores NaN entries.
    """
    if not np.any((m != 0) & ~np.isnan(m)):
        return m
    with np.errstate(invalid="ignore", divide="ignore"):
        if rescale:
            m = (m - m.min()) / (m.max() - m.min())
        return m / m.sum()


def similarity(saliency_map: np.ndarray, label: np.ndarray) -> float:
    """Similarity / histogram intersection (``similarity.m``), in [0, 1] or NaN.

    ``saliency_map`` [h, w] is resized bicubically to ``label`` [H, W]; each map that is not
    all zero is min-max normalised then divided by its sum; the score is ``sum(min(p, q))``.
    A zero map scores 0; a constant non-zero map gives NaN.
    """
    map2 = _as_map("label", label)
    map1 = _resize_to(_as_map("saliency_map", saliency_map), map2.shape)
    map1 = _distribution(map1, rescale=True)
    map2 = _distribution(map2, rescale=True)
    if np.all(np.isnan(map1)) or np.all(np.isnan(map2)):
        return math.nan
    return float(np.sum(np.fmin(map1, map2)))


def kl_divergence(saliency_map: np.ndarray, label: np.ndarray) -> float:
    """KL divergence of ``label`` from the prediction (``KLdiv.m``), >= 0 (nats).

    ``saliency_map`` [h, w] is resized bicubically to ``label`` [H, W]; each non-zero map is
    divided by its sum; ``sum(q * log(eps + q / (p + eps)))`` with MATLAB's ``eps``.
    NaN if a map is all NaN. A prediction that is negative somewhere (possible only after
    bicubic enlargement overshoots; the official loop compares equal sizes) also gives NaN
    here, where MATLAB's ``log`` would return a complex number.
    """
    map2 = _as_map("label", label)
    map1 = _resize_to(_as_map("saliency_map", saliency_map), map2.shape)
    map1 = _distribution(map1, rescale=False)
    map2 = _distribution(map2, rescale=False)
    with np.errstate(invalid="ignore"):
        return float(np.sum(map2 * np.log(EPS + map2 / (map1 + EPS))))


# --------------------------------------------------------------------------- evaluation


def evaluate_frame(
    pred: np.ndarray,
    label: np.ndarray,
    fixations: np.ndarray | None,
    *,
    rng: np.random.Generator,
    jitter: bool = True,
    shape: tuple[int, int] = FIXATION_SHAPE,
) -> dict[str, float]:
    """Scores of one frame, as one iteration of the official ``calcFor*.m`` loop.

    ``pred`` [H, W] and ``label`` [H, W]: prediction and ground-truth map at the model's
    resolution, any range (each is min-max normalised first; a constant one gives NaN).
    CC, SIM and KLD compare the two at that resolution.
    ``fixations``: int [N, 2] 0-based (row, col) fixation points on the ``shape`` frame
    (TrafficGaze, DrFixD-rainy: 720x1280; DADA-2000: 660x1584); AUC_B, AUC_J and NSS compare
    the prediction (bicubic resized, nearest for NSS) with the binary fixation map built from
    them. ``None`` (BDDA, whose official script reports CC, SIM and KLD only) leaves those
    three keys out.

    Draws from ``rng`` in the official order: AUC-Borji's samples, then AUC-Judd's jitter
    (skipped with ``jitter=False``). Returns ``{metric: score}`` in :data:`METRIC_ORDER`.
    """
    p = minmax_normalize(_as_finite_map("pred", pred))
    f = minmax_normalize(_as_finite_map("label", label))
    scores: dict[str, float] = {}
    if fixations is not None:
        fix = fixation_map(fixations, shape)
        scores.update(_aucs(p, fix, rng, jitter))
        scores["NSS"] = nss(p, fix)
    scores["CC"] = cc(p, f)
    scores["SIM"] = similarity(p, f)
    scores["KLD"] = kl_divergence(p, f)
    return scores


def _aucs(p: np.ndarray, fix: np.ndarray, rng: np.random.Generator, jitter: bool
          ) -> dict[str, float]:
    # Both AUCs resize the same map bicubically to the fixation map's size: do it once.
    big = imresize(p, fix.shape)
    return {"AUC_B": auc_borji(big, fix, rng=rng),
            "AUC_J": auc_judd(big, fix, rng=rng, jitter=jitter)}


def frame_aucs(pred: np.ndarray, fixations: np.ndarray, *, rng: np.random.Generator,
               jitter: bool = True, shape: tuple[int, int] = FIXATION_SHAPE
               ) -> dict[str, float]:
    """AUC_B and AUC_J of one frame exactly as :func:`evaluate_frame` computes them (same
    draws from ``rng``, same order): the random metrics alone, to score them under more
    seeds."""
    p = minmax_normalize(_as_finite_map("pred", pred))
    return _aucs(p, fixation_map(fixations, shape), rng, jitter)


def uniform_scores(label: np.ndarray, fixations: np.ndarray | None) -> dict[str, float]:
    """The scores of a uniform (constant) prediction, keys as :func:`evaluate_frame`.

    The official loops min-max normalise every prediction, which a constant map cannot survive
    (0/0: NaN on every metric), so the uniform baseline takes each metric's value for a map
    that ranks all pixels equally: AUC_B = AUC_J = 0.5 (the ROC is the diagonal), NSS = 0 and
    CC = 0 (no deviation from the mean), SIM and KLD from the uniform distribution 1 / pixels
    against the label's distribution as ``similarity.m`` and ``KLdiv.m`` form it. An undefined
    label (constant: NaN after min-max) gives NaN, as it does for any prediction.
    """
    f = minmax_normalize(_as_finite_map("label", label))
    scores: dict[str, float] = {}
    if fixations is not None:
        scores.update({"AUC_B": 0.5, "AUC_J": 0.5, "NSS": 0.0})
    undefined = bool(np.all(np.isnan(f)))
    uniform = 1.0 / f.size
    scores["CC"] = math.nan if undefined else 0.0
    sim = _distribution(f, rescale=True)
    scores["SIM"] = math.nan if undefined else float(np.sum(np.fmin(uniform, sim)))
    q = _distribution(f, rescale=False)
    with np.errstate(invalid="ignore"):
        scores["KLD"] = float(np.sum(q * np.log(EPS + q / (uniform + EPS))))
    return scores


def _as_finite_map(name: str, array: np.ndarray) -> np.ndarray:
    out = _as_map(name, array)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: map contains NaN or inf")
    return out


@dataclass(frozen=True)
class DatasetScores:
    """Dataset-level result of :func:`aggregate`.

    ``means``: metric -> plain mean over frames, as the official scripts' ``mean(scores(:))``:
    one NaN frame makes that metric's mean NaN. ``nan_frames``: metric -> how many frames
    scored NaN (so a NaN mean can be explained). ``n_frames``: frames averaged.
    """

    means: dict[str, float]
    nan_frames: dict[str, int]
    n_frames: int


def aggregate(frames: Iterable[Mapping[str, float]]) -> DatasetScores:
    """Average per-frame scores from :func:`evaluate_frame` the way the official scripts do.

    Every frame must have the same metric keys; keys come out in :data:`METRIC_ORDER`.
    """
    rows = list(frames)
    if not rows:
        raise ValueError("aggregate: no frames to average")
    keys = set(rows[0])
    for k, row in enumerate(rows):
        if set(row) != keys:
            raise ValueError(
                f"aggregate: frame {k} has metrics {sorted(row)}, frame 0 has {sorted(keys)}"
            )
    names = [m for m in METRIC_ORDER if m in keys] + sorted(keys - set(METRIC_ORDER))
    values = {m: np.array([row[m] for row in rows], dtype=np.float64) for m in names}
    return DatasetScores(
        means={m: float(np.mean(v)) for m, v in values.items()},
        nan_frames={m: int(np.isnan(v).sum()) for m, v in values.items()},
        n_frames=len(rows),
    )


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4,
                 spread: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Markdown table, one row per entry of ``results`` (name -> metric -> mean).

    Columns follow the paper: AUC_B, AUC_J, NSS, CC, SIM, KLD. A metric the row does not have
    (e.g. the AUCs and NSS of BDDA) shows as "-", a NaN mean as "NaN"; a standard deviation in
    ``spread`` (name -> metric -> std) as "mean ± std".
    """
    lines = ["| | " + " | ".join(METRIC_ORDER) + " |", "|---" * (len(METRIC_ORDER) + 1) + "|"]
    for name, scores in results.items():
        cells = []
        for metric in METRIC_ORDER:
            value = scores.get(metric)
            if value is None:
                cells.append("-")
            elif math.isnan(value):
                cells.append("NaN")
            else:
                std = (spread or {}).get(name, {}).get(metric)
                cells.append(f"{value:.{digits}f}" + ("" if std is None else
                                                      f" ± {std:.{digits}f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
