"""DR(eye)VE's own metrics against a transcription, in this test, of its authors' script
(``ndrplz/dreyeve``, ``experiments/metrics/metrics.py``: OpenCV's min-max ``normalize``,
``np.std`` and ``np.corrcoef``), and evaluate's protocol table against means taken here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.formats.prepared import PreparedDataset
from salmm.data.samples import iter_samples
from salmm.evaluation.baselines import fit_baseline
from salmm.evaluation.evaluator import evaluate
from salmm.evaluation.options import EvalOptions
from salmm.evaluation.protocols import PROTOCOLS, aggregate, dreyeve_cc, dreyeve_ig, dreyeve_kld
from tests._inference_data import write_prepared


def script_kld(y_true, y_pred):
    y_true, y_pred = y_true.astype(np.float32), y_pred.astype(np.float32)
    eps = np.finfo(np.float32).eps
    p = y_pred / (eps + np.sum(y_pred))
    q = y_true / (eps + np.sum(y_true))
    return np.sum(q * np.log(eps + q / (eps + p)))


def script_cc(y_true, y_pred):
    y_pred, y_true = y_pred.astype(np.float32), y_true.astype(np.float32)
    eps = np.finfo(np.float32).eps
    cv2.normalize(y_pred, dst=y_pred, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX)
    cv2.normalize(y_true, dst=y_true, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX)
    y_pred, y_true = y_pred.ravel(), y_true.ravel()
    y_pred = (y_pred - np.mean(y_pred)) / (eps + np.std(y_pred))
    y_true = (y_true - np.mean(y_true)) / (eps + np.std(y_true))
    return np.corrcoef(y_pred, y_true)[0][1]


def script_ig(y_true, y_pred, y_base):
    y_true, y_pred, y_base = (a.astype(np.float32) for a in (y_true, y_pred, y_base))
    eps = np.finfo(np.float32).eps
    y_pred -= np.min(y_pred)
    y_pred /= np.max(y_pred)
    y_base -= np.min(y_base)
    y_base /= np.max(y_base)
    p = y_pred / (eps + np.sum(y_pred))
    b = y_base / (eps + np.sum(y_base))
    q = y_true > 0
    return np.mean(np.log2(eps + p[q]) - np.log2(eps + b[q]))


def _maps(rng, shape=(36, 64)):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    pred = np.exp(-((yy - rng.uniform(5, 30)) ** 2 + (xx - rng.uniform(5, 60)) ** 2)
                  / rng.uniform(20, 200)) + rng.uniform(0, 0.05, shape)
    gt = np.round(255 * np.exp(-((yy - rng.uniform(5, 30)) ** 2 + (xx - rng.uniform(5, 60)) ** 2)
                               / rng.uniform(10, 80)))
    gt[gt < 20] = 0                         # a fixation map: zero away from the fixations
    base = np.exp(-((yy - 18) ** 2 + (xx - 32) ** 2) / 300.0)
    return pred, gt, base


@pytest.mark.parametrize("seed", range(6))
def test_dreyeve_metrics_equal_the_authors_script(seed):
    rng = np.random.default_rng(seed)
    pred, gt, base = _maps(rng)
    assert dreyeve_cc(pred, gt) == pytest.approx(float(script_cc(gt, pred)), rel=1e-5, abs=1e-6)
    assert dreyeve_kld(pred, gt) == pytest.approx(float(script_kld(gt, pred)), rel=1e-5)
    assert dreyeve_ig(pred, gt, base) == pytest.approx(float(script_ig(gt, pred, base)),
                                                       rel=1e-5, abs=1e-5)


def test_undefined_cases():
    flat = np.ones((8, 8))
    gt = np.zeros((8, 8))
    gt[3, 3] = 255
    assert math.isnan(dreyeve_cc(flat, gt))             # np.corrcoef of a constant: NaN
    assert math.isnan(dreyeve_ig(flat, np.zeros((8, 8)), gt))     # no fixated pixel
    with np.errstate(invalid="ignore"):                            # the script: 0 / 0
        assert math.isnan(script_ig(gt, flat, gt))
    assert math.isnan(dreyeve_ig(flat, gt, gt))                    # a constant prediction
    assert math.isnan(dreyeve_ig(gt, gt, flat))                    # a constant baseline
    assert dreyeve_kld(flat, gt) > 0


def test_means_per_sequence_then_over_sequences():
    rows = [{"video": 38, "protocol": {"CC": 0.2, "KLD": 1.0, "IG": math.nan}},
            {"video": 38, "protocol": {"CC": 0.4, "KLD": 3.0, "IG": 1.0}},
            {"video": 39, "protocol": {"CC": 0.9, "KLD": 2.0, "IG": math.nan}}]
    means = aggregate(rows, PROTOCOLS["dreyeve"])
    assert means["CC"] == pytest.approx((0.3 + 0.9) / 2)      # not the frame mean 0.5
    assert means["KLD"] == pytest.approx((2.0 + 2.0) / 2)
    assert means["IG"] == pytest.approx(1.0)                 # 39 has none: left out


def test_evaluate_adds_the_protocol_table_for_dreyeve_only(tmp_path: Path):
    prepared, _ = write_prepared(tmp_path / "dreyeve", "dreyeve",
                                 {"train": [(1, 3)], "test": [(2, 2), (3, 3)]})
    summary = evaluate(EvalOptions(checkpoint=None, baseline="center", prepared=str(prepared),
                                   out=str(tmp_path / "ev"), workers=0))
    data = PreparedDataset.open(str(prepared))
    labels = {split: [(s["meta"]["video"], s["label"][0].numpy().astype(np.float64))
                      for s in iter_samples(data, split)] for split in ("train", "test")}
    base = np.mean([label for _, label in labels["train"]], axis=0)
    pred = fit_baseline("center", data).map          # the predictor scored (its input)
    rows = [{"video": video, "protocol": {
        "CC": float(script_cc(np.round(label * 255), pred)),
        "KLD": float(script_kld(np.round(label * 255), pred)),
        "IG": float(script_ig(np.round(label * 255), pred, base))}}
        for video, label in labels["test"]]
    want = aggregate(rows, PROTOCOLS["dreyeve"])
    got = summary["protocol"]
    assert got["name"] == "DR(eye)VE protocol" and got["videos"] == 2
    for metric in ("CC", "KLD", "IG"):
        assert got["means"][metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-5)
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "DR(eye)VE protocol" in table and "| | CC | KLD | IG |" in table
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["protocol"] == got

    other, _ = write_prepared(tmp_path / "bdda", "bdda", {"train": [(1, 2)], "test": [(2, 2)]})
    plain = evaluate(EvalOptions(checkpoint=None, baseline="center", prepared=str(other),
                                 out=str(tmp_path / "ev2"), workers=0))
    assert plain["protocol"] is None
    assert "protocol" not in (tmp_path / "ev2" / "results.md").read_text()
