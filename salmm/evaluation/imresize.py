"""MATLAB ``imresize`` for 2-D float maps (bicubic and nearest), in float64.

The MIT saliency benchmark code that the published SalM² evaluation runs resizes every
prediction with MATLAB's ``imresize``: bicubic (the default) for AUC-Judd, AUC-Borji, CC,
SIM and KLD, nearest neighbour for NSS. To give the same scores the resize has to be the
same, so this module reimplements MATLAB's separable "contributions" algorithm:

* output sample ``x`` (1-based) maps to input coordinate ``u = x/scale + 0.5*(1 - 1/scale)``
  where ``scale = out_len / in_len`` (as a double);
* the taps are ``left + (0 .. P-1)`` with ``left = floor(u - width/2)`` and
  ``P = ceil(width) + 2``; each tap weighs ``kernel(u - tap)``;
* when shrinking with antialiasing (the bicubic default) the kernel is stretched:
  ``scale * kernel(scale * d)`` with ``width / scale`` taps, which low-pass filters the map;
* each output's weights are divided by their sum, taps that fall outside the input are
  mirrored with the edge sample repeated (MATLAB's symmetric padding:
  ``..., 2, 1 | 1, 2, ..., n | n, n-1, ...``), and taps whose weight is zero for every output
  are dropped;
* the two dimensions are resized one after the other, the one with the smaller scale first
  (rows first on a tie), each output accumulated tap by tap in order.

``imresize`` is the vectorised path (one gather per tap); ``imresize_reference`` is the
same definition written as plain loops that build dense resampling matrices. The tests check
that they agree.

Residual differences from MATLAB: MATLAB's compiled inner loop may use fused multiply-adds,
so results can differ in the last bit or two (around 1e-16 relative). Only 2-D float maps are
handled (no uint8 rounding, no colour, no custom kernels, no scale-factor argument).
GNU Octave's ``imresize`` (image package 2.14) agrees when enlarging (to about 5e-14 at
256x256 -> 720x1280, the evaluation's case) but not when shrinking, where it does not
renormalise the stretched kernel's weights; it is therefore no reference for shrinking.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Method = Literal["bicubic", "nearest"]


def cubic(d: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``), elementwise, float64."""
    a = np.abs(d)
    a2 = a * a
    a3 = a2 * a
    inner = (1.5 * a3 - 2.5 * a2 + 1.0) * (a <= 1)
    outer = (-0.5 * a3 + 2.5 * a2 - 4.0 * a + 2.0) * ((a > 1) & (a <= 2))
    return inner + outer


def box(d: np.ndarray) -> np.ndarray:
    """Nearest-neighbour kernel (MATLAB's ``box``): 1 on [-0.5, 0.5), else 0, float64."""
    return ((d >= -0.5) & (d < 0.5)).astype(np.float64)


_KERNELS = {"bicubic": (cubic, 4.0), "nearest": (box, 1.0)}


def _check(image: np.ndarray, output_shape: tuple[int, int], method: str) -> np.ndarray:
    if method not in _KERNELS:
        raise ValueError(f"imresize: method must be 'bicubic' or 'nearest', got {method!r}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"imresize: expected a non-empty 2-D map, got shape {image.shape}")
    if len(output_shape) != 2 or any(int(n) != n or n < 1 for n in output_shape):
        raise ValueError(f"imresize: output_shape must be two positive ints, got {output_shape}")
    return image


def _dimension_order(in_shape: tuple[int, int], out_shape: tuple[int, int]) -> list[int]:
    """Axes in the order MATLAB resizes them: smallest scale first, rows first on a tie."""
    scales = [out_shape[k] / in_shape[k] for k in (0, 1)]
    return sorted((0, 1), key=lambda k: scales[k])


def contributions(
    in_len: int, out_len: int, method: Method = "bicubic", antialias: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Resampling weights and 0-based input indices for one dimension.

    Returns ``(weights [out_len, P] float64, indices [out_len, P] int64)`` with
    ``out[i] = sum_p weights[i, p] * in[indices[i, p]]``. ``antialias`` defaults to MATLAB's
    default: True for bicubic, False for nearest (it only matters when shrinking).
    """
    kernel, width = _KERNELS[method]
    if antialias is None:
        antialias = method == "bicubic"
    scale = out_len / in_len
    if scale < 1 and antialias:
        base_kernel = kernel

        def kernel(d: np.ndarray) -> np.ndarray:
            return scale * base_kernel(scale * d)

        width = width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)[:, None]
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = left + np.arange(math.ceil(width) + 2, dtype=np.float64)[None, :]
    weights = kernel(u - taps)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    indices = mirror[np.mod(taps.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def imresize(
    image: np.ndarray,
    output_shape: tuple[int, int],
    method: Method = "bicubic",
    antialias: bool | None = None,
) -> np.ndarray:
    """Resize a 2-D map like MATLAB ``imresize(image, output_shape, method)``.

    ``image`` [H, W] (any real dtype, converted to float64); returns [output_shape] float64.
    Values are not clipped: bicubic can overshoot the input range, as in MATLAB. A map that
    already has ``output_shape`` is returned as a float64 copy (MATLAB's weights are the
    identity in that case).
    """
    image = _check(image, output_shape, method)
    out_shape = (int(output_shape[0]), int(output_shape[1]))
    if image.shape == out_shape:
        return image.copy()
    result = image
    for axis in _dimension_order(image.shape, out_shape):
        weights, indices = contributions(result.shape[axis], out_shape[axis], method, antialias)
        moved = np.moveaxis(result, axis, 0)
        acc = weights[:, 0, None] * moved[indices[:, 0]]
        for p in range(1, weights.shape[1]):
            acc = acc + weights[:, p, None] * moved[indices[:, p]]
        result = np.moveaxis(acc, 0, axis)
    return result


def _mirror_reference(index: int, n: int) -> int:
    """Fold a 1-based tap index into 1..n by repeated reflection with the edge repeated."""
    while index < 1 or index > n:
        index = 1 - index if index < 1 else 2 * n + 1 - index
    return index


def resampling_matrix_reference(
    in_len: int, out_len: int, method: Method = "bicubic", antialias: bool | None = None
) -> np.ndarray:
    """Dense [out_len, in_len] resampling matrix built output by output, tap by tap."""
    kernel, width = _KERNELS[method]
    if antialias is None:
        antialias = method == "bicubic"
    scale = out_len / in_len
    stretch = scale < 1 and antialias
    if stretch:
        width = width / scale
    matrix = np.zeros((out_len, in_len))
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = range(left, left + math.ceil(width) + 2)
        row = []
        for tap in taps:
            d = np.array([u - tap])
            w = scale * kernel(scale * d)[0] if stretch else kernel(d)[0]
            row.append((tap, w))
        total = sum(w for _, w in row)
        for tap, w in row:
            matrix[x - 1, _mirror_reference(tap, in_len) - 1] += w / total
    return matrix


def imresize_reference(
    image: np.ndarray,
    output_shape: tuple[int, int],
    method: Method = "bicubic",
    antialias: bool | None = None,
) -> np.ndarray:
    """Plain reference for :func:`imresize`: ``R @ image @ C.T`` with loop-built matrices.

    Same definition, different arithmetic order, so it agrees with :func:`imresize` to
    about 1e-12, not bit for bit. Slow (pure-Python loops); for tests on small maps.
    """
    image = _check(image, output_shape, method)
    rows = resampling_matrix_reference(image.shape[0], int(output_shape[0]), method, antialias)
    cols = resampling_matrix_reference(image.shape[1], int(output_shape[1]), method, antialias)
    return rows @ image @ cols.T
