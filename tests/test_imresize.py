"""salmm.evaluation.imresize: MATLAB imresize semantics, fast path against the loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from salmm.evaluation.imresize import contributions, imresize, imresize_reference

SHAPES = [
    ((7, 9), (20, 31)),  # enlarge both
    ((30, 40), (11, 17)),  # shrink both (antialiased)
    ((9, 9), (4, 23)),  # shrink rows, enlarge columns
    ((5, 6), (5, 13)),  # one dimension unchanged
    ((1, 8), (3, 5)),  # single row: every tap is mirrored
    ((16, 16), (45, 80)),  # the 256x256 -> 720x1280 ratios of the evaluation, scaled down
]


@pytest.mark.parametrize(("in_shape", "out_shape"), SHAPES)
@pytest.mark.parametrize("method", ["bicubic", "nearest"])
@pytest.mark.parametrize("antialias", [None, False, True])
def test_fast_path_matches_reference(in_shape, out_shape, method, antialias):
    image = np.random.default_rng(0).random(in_shape)
    fast = imresize(image, out_shape, method, antialias)
    ref = imresize_reference(image, out_shape, method, antialias)
    assert fast.shape == out_shape and fast.dtype == np.float64
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)


def test_known_matlab_value_bicubic_without_antialiasing():
    # MATLAB: imresize(reshape(0:15,4,4)', 0.5, 'bicubic', 'Antialiasing', false)
    image = np.arange(16, dtype=float).reshape(4, 4)
    out = imresize(image, (2, 2), "bicubic", antialias=False)
    np.testing.assert_allclose(out, [[2.1875, 4.3125], [10.6875, 12.8125]], atol=1e-12)


def test_nearest_integer_enlargement_repeats_pixels():
    image = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = imresize(image, (4, 6), "nearest")
    np.testing.assert_array_equal(out, np.repeat(np.repeat(image, 2, axis=0), 3, axis=1))


def test_same_shape_is_an_exact_copy():
    image = np.random.default_rng(1).random((6, 7)).astype(np.float32)
    out = imresize(image, (6, 7))
    assert out.dtype == np.float64 and out is not image
    np.testing.assert_array_equal(out, image.astype(np.float64))


@pytest.mark.parametrize("out_shape", [(3, 5), (25, 41)])
def test_constant_map_stays_constant(out_shape):
    # Weights of every output are normalised to sum to 1, also for the stretched kernel.
    out = imresize(np.full((10, 12), 0.37), out_shape)
    np.testing.assert_allclose(out, 0.37, rtol=0, atol=1e-15)


def test_bicubic_reproduces_a_linear_ramp_away_from_the_border():
    ramp = np.tile(np.arange(10, dtype=float), (3, 1))
    out = imresize(ramp, (3, 40))
    # Output column x (1-based) samples input coordinate u = x/4 + 0.375 (1-based).
    u = np.arange(1, 41) / 4 + 0.375
    interior = (u > 3) & (u < 8)
    np.testing.assert_allclose(
        out[:, interior], np.broadcast_to(u[interior] - 1, (3, interior.sum()))
    )
    # At the border the mirrored taps bend the ramp (MATLAB's symmetric padding).
    assert out[0, 0] > u[0] - 1


def test_antialiasing_low_passes_when_shrinking():
    stripes = np.tile([1.0, 0.0], 20)[None, :].repeat(4, axis=0)
    smooth = imresize(stripes, (4, 11))
    aliased = imresize(stripes, (4, 11), antialias=False)
    np.testing.assert_allclose(smooth[:, 2:-2], 0.5, atol=0.01)  # the stripes' mean
    assert np.ptp(aliased) > 0.9  # point samples of the stripes


def test_contributions_mirror_edge_taps_and_sum_to_one():
    weights, indices = contributions(3, 7)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    assert indices.min() == 0 and indices.max() == 2
    # First output sits left of the first input centre: its left taps fold back onto 0, 1.
    assert set(indices[0]) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("image", "shape", "method"),
    [
        (np.zeros((2, 2, 3)), (4, 4), "bicubic"),
        (np.zeros((0, 3)), (4, 4), "bicubic"),
        (np.zeros((2, 2)), (0, 4), "bicubic"),
        (np.zeros((2, 2)), (4, 4), "bilinear"),
    ],
)
def test_bad_arguments_raise(image, shape, method):
    with pytest.raises(ValueError, match="imresize"):
        imresize(image, shape, method)
