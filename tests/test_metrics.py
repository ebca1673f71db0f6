"""salmm.evaluation.metrics: hand-checked values, MATLAB edge cases, fast paths against references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from salmm.evaluation import metrics as M
from salmm.evaluation.imresize import imresize


def _blobs(shape, centres, sigma, rng=None):
    """A smooth saliency-like map: sum of Gaussians (+ optional noise)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape)
    for r, c in centres:
        out += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
    if rng is not None:
        out += 0.05 * rng.random(shape)
    return out


def _random_fixations(rng, n, shape):
    return np.stack([rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)], axis=1)


def _cases():
    rng = np.random.default_rng(7)
    shape = (48, 80)
    fix = M.fixation_map(_random_fixations(rng, 25, shape), shape)
    smooth = _blobs(shape, [(20, 30), (30, 60)], 8.0, rng)
    return {
        "uniform noise": (rng.random(shape), fix),
        "blobs": (smooth, fix),
        "ties on a 0.1 grid": (np.round(rng.random(shape) * 10) / 10, fix),
        "few levels": (rng.integers(0, 3, shape).astype(float), fix),
        "smaller map (bicubic resize)": (rng.random((12, 20)), fix),
        "two fixations": (smooth, M.fixation_map([[3, 4], [40, 70]], shape)),
    }


CASES = _cases()


# --------------------------------------------------------------------------- AUC-Judd


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("jitter", [True, False])
def test_auc_judd_matches_reference(case, jitter):
    sal, fix = CASES[case]
    fast = M.auc_judd(sal, fix, rng=np.random.default_rng(3), jitter=jitter)
    ref = M.auc_judd_reference(sal, fix, rng=np.random.default_rng(3), jitter=jitter)
    assert 0.0 <= fast <= 1.0
    assert fast == pytest.approx(ref, abs=1e-12)


def test_auc_judd_counts_ties_across_bins_exactly():
    # Many pixels equal to a threshold, and thresholds 1 ulp apart, stress the binned count.
    rng = np.random.default_rng(11)
    sal = rng.choice([0.0, 0.5, np.nextafter(0.5, 1), 1.0], size=(30, 30))
    fix = M.fixation_map(_random_fixations(rng, 40, (30, 30)), (30, 30))
    assert M.auc_judd(sal, fix, jitter=False) == pytest.approx(
        M.auc_judd_reference(sal, fix, jitter=False), abs=1e-12
    )


def test_auc_judd_hand_values():
    sal = np.array([[0.9, 0.1], [0.5, 0.2]])
    top = np.array([[1.0, 0], [0, 0]])
    assert M.auc_judd(sal, top, jitter=False) == pytest.approx(1.0)
    # Fixation on 0.5: 2 pixels >= it -> fp = 1/3; tp/fp = (0,0) (1,1/3) (1,1) -> area 5/6.
    second = np.array([[0.0, 0], [1, 0]])
    assert M.auc_judd(sal, second, jitter=False) == pytest.approx(5 / 6)


def test_auc_judd_jitter_is_one_documented_draw():
    sal, fix = CASES["few levels"]
    noise = np.random.default_rng(5).random(fix.shape)
    expected = M.auc_judd(sal + noise / 10000000, fix, jitter=False)
    assert M.auc_judd(sal, fix, rng=np.random.default_rng(5)) == expected
    # Jitter breaks the ties of a 3-level map, so the score really depends on it.
    assert expected != M.auc_judd(sal, fix, jitter=False)


def test_auc_judd_nan_cases():
    sal = np.random.default_rng(0).random((5, 5))
    assert math.isnan(M.auc_judd(sal, np.zeros((5, 5)), rng=np.random.default_rng(0)))
    fix = np.eye(5)
    assert math.isnan(M.auc_judd(np.full((5, 5), 0.3), fix, jitter=False))
    assert not math.isnan(M.auc_judd(np.full((5, 5), 0.3), fix, rng=np.random.default_rng(0)))
    with pytest.raises(ValueError, match="rng"):
        M.auc_judd(sal, fix)


# --------------------------------------------------------------------------- AUC-Borji


@pytest.mark.parametrize("case", CASES)
def test_auc_borji_matches_reference(case):
    sal, fix = CASES[case]
    fast = M.auc_borji(sal, fix, rng=np.random.default_rng(4))
    ref = M.auc_borji_reference(sal, fix, rng=np.random.default_rng(4))
    assert 0.0 <= fast <= 1.0
    assert fast == pytest.approx(ref, abs=1e-12)


def test_auc_borji_split_maximum_below_one_uses_clipped_thresholds():
    # Values only on {0, 0.1, 0.3} except one far pixel at 1: most splits top out at 0.3.
    rng = np.random.default_rng(2)
    sal = rng.choice([0.0, 0.1, 0.3], size=(40, 40))
    sal[0, 0] = 1.0
    fix = M.fixation_map(_random_fixations(rng, 10, (40, 40)) + [1, 1], (40, 40))
    fix[0, 0] = 0
    fast = M.auc_borji(sal, fix, rng=np.random.default_rng(9), n_splits=50)
    ref = M.auc_borji_reference(sal, fix, rng=np.random.default_rng(9), n_splits=50)
    assert fast == pytest.approx(ref, abs=1e-12)


def test_auc_borji_draws_are_documented():
    sal, fix = CASES["blobs"]
    rng = np.random.default_rng(8)
    M.auc_borji(sal, fix, rng=rng, n_splits=7)
    replay = np.random.default_rng(8)
    replay.integers(0, fix.size, size=(int(fix.sum()), 7))
    assert rng.random() == replay.random()


def test_auc_borji_perfect_and_nan_cases():
    fix = np.zeros((10, 10))
    fix[2, 3] = fix[7, 7] = 1
    sal = fix * 0.9 + 0.05
    # Fixated pixels hold the maximum; random pixels almost never do: AUC close to 1.
    assert M.auc_borji(sal, fix, rng=np.random.default_rng(1)) > 0.95
    one = np.zeros((10, 10))
    one[1, 1] = 1
    assert math.isnan(M.auc_borji(sal, one, rng=np.random.default_rng(1)))
    assert math.isnan(M.auc_borji(np.ones((10, 10)), fix, rng=np.random.default_rng(1)))


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1.0, [k / 10 for k in range(11)]),
        (0.3, [0.0, 0.1, 0.2, 0.3]),  # 3 * 0.1 > 0.3 in doubles: counted, clipped to the limit
        (0.35, [0.0, 0.1, 0.2, 3 * 0.1]),
        (0.05, [0.0]),
        (0.0, [0.0]),
    ],
)
def test_borji_thresholds_follow_the_colon_rule(limit, expected):
    got = M.borji_thresholds(limit, 0.1)
    assert got.size == len(expected)
    assert got[-1] <= limit
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(got[:-1], np.arange(len(expected) - 1) * 0.1)


# --------------------------------------------------------------------------- NSS, CC, SIM, KLD


def test_nss_hand_value_and_nearest_resize():
    sal = np.array([[1.0, 2.0], [3.0, 4.0]])
    fix = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert M.nss(sal, fix) == pytest.approx((4 - 2.5) / np.std([1, 2, 3, 4], ddof=1))
    # On a 4x4 fixation map the 2x2 map is replicated in 2x2 blocks (nearest neighbour).
    big = np.zeros((4, 4))
    big[0, 1] = big[3, 3] = 1
    z = (sal - sal.mean()) / np.std(sal, ddof=1)
    assert M.nss(sal, big) == pytest.approx((z[0, 0] + z[1, 1]) / 2)
    assert math.isnan(M.nss(sal, np.zeros((2, 2))))
    assert math.isnan(M.nss(np.ones((2, 2)), fix))


def test_cc_is_pearson_and_resizes_bicubically():
    rng = np.random.default_rng(0)
    a, b = rng.random((9, 11)), rng.random((9, 11))
    assert M.cc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-14)
    assert M.cc(a, 3 * a + 1) == pytest.approx(1.0)
    small = rng.random((3, 4))
    assert M.cc(small, b) == pytest.approx(M.cc(imresize(small, (9, 11)), b), abs=1e-14)
    assert math.isnan(M.cc(np.ones((9, 11)), b))


def test_similarity_values_and_zero_maps():
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert M.similarity(a, a) == pytest.approx(1.0)
    # min-max -> [0, 1/3, 2/3, 1] / 2 vs [1, 0, 0, 0] -> intersection 0.
    assert M.similarity(a, np.array([[1.0, 0], [0, 0]])) == 0.0
    assert M.similarity(a, 5 * a + 7) == pytest.approx(1.0)  # min-max removes offset/scale
    assert M.similarity(np.zeros((2, 2)), a) == 0.0  # a zero map stays zero
    assert math.isnan(M.similarity(np.ones((2, 2)), a))  # constant non-zero map: 0/0


def test_kl_divergence_values_and_zero_maps():
    p = np.array([[1.0, 1.0]])
    q = np.array([[1.0, 0.0]])
    expected = math.log(M.EPS + 1 / (0.5 + M.EPS))
    assert M.kl_divergence(p, q) == pytest.approx(expected, rel=1e-15)
    rng = np.random.default_rng(0)
    a = rng.random((6, 6))
    assert abs(M.kl_divergence(a, a)) < 1e-12
    assert M.kl_divergence(a, np.zeros((6, 6))) == 0.0
    # A zero prediction is left at zero: the divergence is huge but finite (eps guards).
    assert 30 < M.kl_divergence(np.zeros((6, 6)), a) < 40
    assert M.EPS == 2.220446049250313e-16


def test_all_nan_maps_score_nan_and_partial_nan_is_an_error():
    nan = np.full((4, 4), np.nan)
    good = np.random.default_rng(0).random((4, 4))
    for metric in (M.cc, M.similarity, M.kl_divergence):
        assert math.isnan(metric(nan, good)) and math.isnan(metric(good, nan))
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.cc(bad, good)
    with pytest.raises(ValueError, match="2-D"):
        M.similarity(good[0], good)


# --------------------------------------------------------------------------- frames & datasets


def test_fixation_map_drops_outside_points_and_counts_repeats_once():
    fmap = M.fixation_map(np.array([[0, 0], [0, 0], [719, 1279], [720, 5], [-1, 3], [5, 1280]]))
    assert fmap.shape == M.FIXATION_SHAPE
    assert fmap.sum() == 2 and fmap[0, 0] == 1 and fmap[719, 1279] == 1
    assert M.fixation_map(np.zeros((0, 2), dtype=int)).sum() == 0
    with pytest.raises(ValueError, match="integer"):
        M.fixation_map(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        M.fixation_map(np.array([1, 2, 3]))


def _frame(seed):
    rng = np.random.default_rng(seed)
    pred = _blobs((36, 64), [(10, 20), (25, 50)], 6.0, rng).astype(np.float32)
    label = _blobs((36, 64), [(12, 22)], 5.0)
    fixations = np.stack([rng.normal(240, 60, 30), rng.normal(400, 80, 30)], axis=1).astype(int)
    return pred, label, fixations


def test_evaluate_frame_follows_the_official_loop():
    pred, label, fixations = _frame(0)
    scores = M.evaluate_frame(pred, label, fixations, rng=np.random.default_rng(1))
    assert list(scores) == list(M.METRIC_ORDER)
    p, f = M.minmax_normalize(pred), M.minmax_normalize(label)
    fix = M.fixation_map(fixations)
    rng = np.random.default_rng(1)  # same draws, same order: Borji's samples, then Judd's jitter
    expected = {
        "AUC_B": M.auc_borji(p, fix, rng=rng),
        "AUC_J": M.auc_judd(p, fix, rng=rng),
        "NSS": M.nss(p, fix),
        "CC": M.cc(p, f),
        "SIM": M.similarity(p, f),
        "KLD": M.kl_divergence(p, f),
    }
    assert scores == pytest.approx(expected, abs=1e-12)
    assert scores["AUC_J"] > 0.8 and scores["CC"] > 0.5  # the prediction overlaps the label


def test_evaluate_frame_without_fixations_and_without_jitter():
    pred, label, fixations = _frame(3)
    bdda = M.evaluate_frame(pred, label, None, rng=np.random.default_rng(0))
    assert list(bdda) == ["CC", "SIM", "KLD"]
    a = M.evaluate_frame(pred, label, fixations, rng=np.random.default_rng(0), jitter=False)
    b = M.evaluate_frame(pred, label, fixations, rng=np.random.default_rng(0), jitter=False)
    assert a == b


def test_evaluate_frame_constant_prediction_scores_nan_like_matlab():
    _, label, fixations = _frame(4)
    scores = M.evaluate_frame(np.ones((36, 64)), label, fixations, rng=np.random.default_rng(0))
    assert all(math.isnan(v) for v in scores.values())
    with pytest.raises(ValueError, match="pred"):
        M.evaluate_frame(np.full((36, 64), np.nan), label, None, rng=np.random.default_rng(0))


def test_aggregate_is_a_plain_mean_and_nan_propagates():
    frames = [
        {"CC": 0.5, "SIM": 0.4, "KLD": 1.0},
        {"CC": 0.7, "SIM": 0.6, "KLD": math.nan},
    ]
    result = M.aggregate(frames)
    assert result.n_frames == 2
    assert list(result.means) == ["CC", "SIM", "KLD"]
    assert result.means["CC"] == pytest.approx(0.6) and result.means["SIM"] == pytest.approx(0.5)
    assert math.isnan(result.means["KLD"])
    assert result.nan_frames == {"CC": 0, "SIM": 0, "KLD": 1}
    with pytest.raises(ValueError, match="frame 1"):
        M.aggregate([{"CC": 1.0}, {"SIM": 1.0}])
    with pytest.raises(ValueError, match="no frames"):
        M.aggregate([])


def test_format_table_uses_the_paper_column_order():
    table = M.format_table(
        {
            "TrafficGaze": {
                "KLD": 0.5,
                "AUC_B": 0.9,
                "AUC_J": 0.95,
                "NSS": 5.0,
                "CC": 0.9,
                "SIM": 0.7,
            },
            "BDDA": {"CC": 0.6, "SIM": math.nan, "KLD": 1.25},
        },
        digits=3,
    )
    lines = table.splitlines()
    assert lines[0] == "| | AUC_B | AUC_J | NSS | CC | SIM | KLD |"
    assert lines[2] == "| TrafficGaze | 0.900 | 0.950 | 5.000 | 0.900 | 0.700 | 0.500 |"
    assert lines[3] == "| BDDA | - | - | - | 0.600 | NaN | 1.250 |"
