"""Saliency labels: the fast path agrees with the reference; the reference is the published one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.datasets import read_frames
from pipeline.formats.labels import (
    fixation_label,
    fixation_label_reference,
    frame_label,
    gaze_map_label,
    label_operators,
)

TOLERANCE = 1e-4
H, W = 720, 1280


def _points(*row_col):
    return np.asarray(row_col, dtype=np.int32).reshape(-1, 2)


def _assert_agree(points, size=(256, 256), source_size=(H, W)):
    reference = fixation_label_reference(points, size, source_size)
    fast = fixation_label(points, size, source_size)
    assert fast.dtype == reference.dtype == np.float32
    assert fast.shape == reference.shape == size
    assert np.abs(fast - reference).max() <= TOLERANCE
    return reference, fast


FIXED_CASES = {
    "no points": _points(),
    "one point, centre": _points((360, 640)),
    "one point, top-left corner": _points((0, 0)),
    "one point, bottom-right corner": _points((719, 1279)),
    "points on all four borders": _points((0, 700), (719, 3), (400, 0), (12, 1279)),
    "near borders (reflect zone)": _points((39, 1250), (700, 80), (160, 159)),
    "duplicates": _points((100, 100), (100, 100), (100, 100), (500, 900)),
    "only out of range": _points((720, 5), (-1, 5), (5, 1280), (5, -3)),
    "in and out of range": _points((720, 5), (300, 300), (5, 1280)),
    "adjacent pixels": _points((300, 300), (300, 301), (301, 300)),
}


@pytest.mark.parametrize("points", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fast_matches_reference_fixed_cases(points):
    reference, fast = _assert_agree(points)
    if ((points >= 0) & (points < (H, W))).all(axis=1).any():
        assert reference.min() == 0 and reference.max() == 1
        assert fast.min() == 0 and abs(fast.max() - 1) < 1e-6
    else:
        assert not reference.any() and not fast.any()


@pytest.mark.parametrize("seed", range(8))
def test_fast_matches_reference_random_sets(seed):
    """Random point sets: 0..80 points, mixed near-border / interior / out-of-range / repeated."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, rng.integers(3, 81)]))
    rows = rng.integers(-10, H + 10, n)
    cols = rng.integers(-10, W + 10, n)
    near = rng.random(n) < 0.4  # pull some points into the 160-pixel reflect zone
    rows[near] = np.where(rng.random(near.sum()) < 0.5, rng.integers(0, 160, near.sum()),
                          rng.integers(H - 160, H, near.sum()))
    repeat = rng.random(n) < 0.2  # duplicates
    if n:
        rows[repeat], cols[repeat] = rows[0], cols[0]
    size = [(256, 256), (224, 384), (37, 100)][seed % 3]
    _assert_agree(np.stack([rows, cols], axis=1).astype(np.int32), size)


@pytest.mark.parametrize("size", [(256, 256), (720, 1280), (1080, 1920), (9, 16)])
def test_fast_matches_reference_down_same_and_up_sizes(size):
    _assert_agree(_points((3, 5), (360, 640), (717, 1275), (200, 1000)), size)


def test_other_source_size():
    _assert_agree(_points((0, 0), (100, 50), (143, 255)), (64, 64), source_size=(144, 256))


def test_reference_is_the_published_recipe():
    """Duplicates do not add, out-of-range points are dropped, the peak sits at the point."""
    one = fixation_label_reference(_points((360, 640)))
    assert np.array_equal(fixation_label_reference(_points((360, 640), (360, 640))), one)
    assert np.array_equal(fixation_label_reference(_points((360, 640), (720, 640), (0, -1))), one)
    assert np.unravel_index(one.argmax(), one.shape) in {(127, 127), (127, 128), (128, 127),
                                                         (128, 128)}
    mask = np.zeros((H, W), np.float32)
    mask[[10, 500], [20, 1200]] = 1
    blurred = cv2.resize(gaussian_filter(mask, 40), (200, 100), interpolation=cv2.INTER_CUBIC)
    expected = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    got = fixation_label_reference(_points((10, 20), (500, 1200)), (100, 200))
    assert np.abs(got - expected).max() < 1e-6


def test_label_operators_are_blur_then_resize_for_any_map():
    """The identity behind the fast path holds for dense maps too, not only impulses."""
    source, size = (90, 160), (40, 56)
    x = np.random.default_rng(3).random(source).astype(np.float32)
    m_rows, m_cols = label_operators(source, size)
    assert m_rows.shape == (40, 90) and m_cols.shape == (56, 160)
    expected = cv2.resize(gaussian_filter(x, 40), size[::-1], interpolation=cv2.INTER_CUBIC)
    assert np.abs(m_rows @ x @ m_cols.T - expected).max() < 1e-5 * expected.max()
    assert not m_rows.flags.writeable


def test_gaze_map_label_is_cubic_resize_over_255():
    gray = np.random.default_rng(0).integers(0, 256, (576, 1024), dtype=np.uint8)
    label = gaze_map_label(gray, (256, 320))
    assert label.dtype == np.float32 and label.shape == (256, 320)
    assert 0 <= label.min() and label.max() <= 1
    expected = cv2.resize(gray, (320, 256), interpolation=cv2.INTER_CUBIC) / np.float32(255)
    assert np.array_equal(label, expected)
    with pytest.raises(ValueError, match="uint8"):
        gaze_map_label(gray.astype(np.float32))


def test_frame_label_per_dataset(tiny_raw):
    cell = np.zeros((2, 4))
    cell[:, 2:4] = [[640.0, 360.0], [100.0, 50.0]]
    traffic = tiny_raw("trafficgaze", {1: [cell]})
    frame = next(read_frames("trafficgaze", traffic, "train"))
    assert np.array_equal(frame_label(frame, (64, 64)), fixation_label(frame.fixations, (64, 64)))
    bdda = tiny_raw("bdda", frames={1: 1})
    frame = next(read_frames("bdda", bdda, "train"))
    gray = cv2.imread(str(frame.gaze_map_path), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(frame_label(frame, (64, 64)), gaze_map_label(gray, (64, 64)))
