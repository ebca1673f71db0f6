"""Saliency labels: the published training targets, as an exact reference and a fast path.

**TrafficGaze / DrFixD-rainy** (what SalM² was trained on): a float32 ``720 x 1280`` map
with 1 at every in-range fixation (duplicates set the same pixel, they do not add),
``scipy.ndimage.gaussian_filter(sigma=40)`` (mode ``reflect``, truncate 4),
``cv2.resize(..., INTER_CUBIC)`` to the target size, then min-max normalised to [0, 1];
an all-zero map stays zero. :func:`fixation_label_reference` does exactly that (~0.1 s).

:func:`fixation_label` gets the same map from the points alone. Blur and resize are
linear and separable, so ``resize(blur(X)) = M_rows @ X @ M_cols.T`` with the 1-D
operators ``M_rows = R_v @ G_h`` ``[H_out, H_src]`` and ``M_cols = R_h @ G_w``
``[W_out, W_src]`` (``G`` the Gaussian filter and ``R`` the cubic resize, each built by
applying the reference operation to an identity matrix, so the reflect boundary and
OpenCV's cubic weights are the reference's own). ``X`` is a sum of unit impulses, so the
map is ``M_rows[:, rows] @ M_cols[:, cols].T`` over the unique points: a ``[H_out, n] @
[n, W_out]`` product instead of a 720x1280 blur. Operators are built in float64, stored
in float32 and cached per (source size, target size). The two agree to ~1e-6 after
normalisation.

**BDDA**: the gaze map JPEG read as greyscale, ``cv2.resize(..., INTER_CUBIC)`` on the
uint8 image (:func:`gaze_map_resized`, what the shards store), divided by 255
(:func:`gaze_map_label`; cheap, so it is its own reference).

**Which points** (fixations are kept in the shards as recorded, float, nothing dropped): the
training label marks :func:`loader_points`, the ones the authors' Python loader marks
(``astype(int)``: truncated toward zero, kept when ``0 <= row < 720`` and ``0 <= col <
1280``); the fixation metrics mark :func:`matlab_points`, the ones the official MATLAB loop
marks (kept when ``0 < row < 721`` and ``0 < col < 1281``, 1-based, so a raw point on row 720
or column 1280 counts there and not in training).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from pipeline.datasets.spec import FRAME_SIZE, Frame
from pipeline.formats.images import decode_gray

SIGMA = 40.0
"""Gaussian blur sigma in source pixels (the published loaders' ``gaussian_filter(mask, 40)``)."""
TRUNCATE = 4.0
MODE = "reflect"
LABEL_SIZE = (256, 256)
"""Default (height, width) of labels, the published model's input size."""


def loader_points(fixations: np.ndarray, source_size: tuple[int, int] = FRAME_SIZE
                  ) -> np.ndarray:
    """The points the authors' Python loader marks in its fixation map.

    Args:
        fixations: [N, 2] (row, col) as recorded (``fixdata`` columns 4 and 3), any real
            numbers, finite.
        source_size: (height, width) of the map.

    Returns:
        int64 ``[M, 2]``: each point truncated toward zero (numpy's ``astype(int)``), kept where
        ``0 <= row < height`` and ``0 <= col < width``, in recorded order.
    """
    points = np.trunc(np.asarray(fixations, dtype=np.float64).reshape(-1, 2))
    height, width = source_size
    keep = ((points[:, 0] >= 0) & (points[:, 0] < height)
            & (points[:, 1] >= 0) & (points[:, 1] < width))
    return points[keep].astype(np.int64)


def matlab_points(fixations: np.ndarray, source_size: tuple[int, int] = FRAME_SIZE
                  ) -> np.ndarray:
    """The points the official MATLAB loop marks (``calcForTrafficGaze.m``: ``if x<721 && x>0 &&
    y<1281 && y>0, fix_map(x, y) = 1``), as 0-based (row, col) int64 ``[M, 2]``.

    MATLAB indexes with the recorded value itself, 1-based; it stops with an error on a
    non-integer index, which the published data never has: such a point is truncated here (and
    dropped if that leaves row or column 0), as the Python loader truncates.
    """
    points = np.asarray(fixations, dtype=np.float64).reshape(-1, 2)
    height, width = source_size
    keep = ((points[:, 0] > 0) & (points[:, 0] < height + 1)
            & (points[:, 1] > 0) & (points[:, 1] < width + 1))
    marked = np.trunc(points[keep]).astype(np.int64) - 1
    return marked[(marked >= 0).all(axis=1)]


def fixation_label_reference(
    fixations: np.ndarray,
    size: tuple[int, int] = LABEL_SIZE,
    source_size: tuple[int, int] = FRAME_SIZE,
) -> np.ndarray:
    """The published fixation label, computed the published way (the test oracle).

    Args:
        fixations: ``[N, 2]`` (row, col) in ``source_size`` pixels, as recorded; the points
            the Python loader marks are taken (:func:`loader_points`).
        size: (height, width) of the label.
        source_size: (height, width) of the fixation map before blurring.

    Returns:
        float32 ``[height, width]`` in [0, 1] (min 0, max 1), or all zeros without points.
    """
    mask = np.zeros(source_size, dtype=np.float32)
    for row, col in loader_points(fixations, source_size):
        mask[row, col] = 1
    mask = gaussian_filter(mask, SIGMA, mode=MODE, truncate=TRUNCATE)
    mask = cv2.resize(mask, size[::-1], interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    if mask.max() == 0:
        return mask
    return (mask - mask.min()) / (mask.max() - mask.min())


def fixation_label(
    fixations: np.ndarray,
    size: tuple[int, int] = LABEL_SIZE,
    source_size: tuple[int, int] = FRAME_SIZE,
) -> np.ndarray:
    """The published fixation label from per-point separable factors (fast path).

    Same arguments and result as :func:`fixation_label_reference` (max abs difference
    ~1e-6), about three orders of magnitude faster.

    Returns:
        float32 ``[height, width]`` in [0, 1], or all zeros without in-range points.
    """
    points = loader_points(fixations, source_size)
    if len(points) == 0:
        return np.zeros(size, dtype=np.float32)
    flat = np.unique(points[:, 0].astype(np.int64) * source_size[1] + points[:, 1])
    rows, cols = np.divmod(flat, source_size[1])
    m_rows, m_cols = label_operators(tuple(source_size), tuple(size))
    # OpenCV's gemm, not numpy's BLAS: for these small products a multi-threaded BLAS loses
    # far more to thread hand-offs than it gains, and stalls badly on a loaded machine.
    label = cv2.gemm(np.ascontiguousarray(m_rows[:, rows]), np.ascontiguousarray(m_cols[:, cols]),
                     1.0, None, 0.0, flags=cv2.GEMM_2_T)
    low = label.min()
    label -= low
    label *= 1.0 / (label.max())
    return label


@lru_cache(maxsize=8)
def label_operators(
    source_size: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D blur-then-resize operators of :func:`fixation_label`.

    Returns:
        ``(M_rows, M_cols)``: float32 ``[H_out, H_src]`` and ``[W_out, W_src]`` with
        ``cv2.resize(gaussian_filter(X), (W_out, H_out), INTER_CUBIC) == M_rows @ X @ M_cols.T``
        for any float ``[H_src, W_src]`` map ``X`` (up to float rounding). Read-only, cached.
    """
    (src_h, src_w), (out_h, out_w) = source_size, size
    m_rows = _resize_operator(src_h, out_h) @ _blur_operator(src_h)
    m_cols = _resize_operator(src_w, out_w) @ _blur_operator(src_w)
    # float32 halves the product's cost at ~1e-6 error after normalisation; Fortran order
    # makes gathering the points' columns in fixation_label a copy of contiguous blocks.
    m_rows = np.asfortranarray(m_rows, dtype=np.float32)
    m_cols = np.asfortranarray(m_cols, dtype=np.float32)
    m_rows.flags.writeable = m_cols.flags.writeable = False
    return m_rows, m_cols


def _blur_operator(n: int) -> np.ndarray:
    """``G [n, n]`` with ``G @ x == gaussian_filter1d(x, SIGMA, mode=MODE, truncate=TRUNCATE)``."""
    return gaussian_filter1d(np.eye(n), SIGMA, axis=0, mode=MODE, truncate=TRUNCATE)


def _resize_operator(n_in: int, n_out: int) -> np.ndarray:
    """``R [n_out, n_in]``: OpenCV's INTER_CUBIC resize along one axis of length ``n_in``.

    Resizing an ``n_in x n_in`` identity to ``n_in x n_out`` rows resizes only vertically
    (the unchanged width is an exact identity for the cubic kernel), so column ``j`` of the
    result is the resized unit impulse ``e_j``.
    """
    return cv2.resize(np.eye(n_in), (n_in, n_out), interpolation=cv2.INTER_CUBIC)


def gaze_map_resized(gray_uint8: np.ndarray, size: tuple[int, int] = LABEL_SIZE) -> np.ndarray:
    """A decoded greyscale gaze map (uint8 ``[H, W]``, any size; BDD-A maps are 576 x 1024)
    resized as the published loader does: ``cv2.resize(INTER_CUBIC)`` on the uint8 image
    (saturating), uint8 ``[height, width]``."""
    if gray_uint8.dtype != np.uint8 or gray_uint8.ndim != 2:
        raise ValueError(
            f"expected a uint8 [H, W] gaze map, got {gray_uint8.dtype} {gray_uint8.shape}")
    return cv2.resize(gray_uint8, size[::-1], interpolation=cv2.INTER_CUBIC)


def gaze_map_label(gray_uint8: np.ndarray, size: tuple[int, int] = LABEL_SIZE) -> np.ndarray:
    """The published BDDA label: float32 ``[height, width]`` in [0, 1], :func:`gaze_map_resized`
    divided by 255. Not renormalised, as in the published loader."""
    return gaze_map_resized(gray_uint8, size).astype(np.float32) / 255.0


def frame_label(frame: Frame, size: tuple[int, int] = LABEL_SIZE) -> np.ndarray:
    """The label of a :class:`~pipeline.datasets.spec.Frame`: float32 ``[height, width]`` in [0, 1].

    Fixation datasets use :func:`fixation_label`; BDDA decodes the gaze map
    (:class:`~pipeline.core.errors.BadInputError` if it is corrupt) and uses :func:`gaze_map_label`.
    """
    if frame.gaze_map_path is not None:
        return gaze_map_label(decode_gray(frame.gaze_map_path), size)
    return fixation_label(frame.fixations, size, frame.source_size)
