"""Parity with the official MATLAB metric code, run under GNU Octave.

The official ``.m`` files (MIT saliency benchmark functions and the authors' ``calcFor*.m``
loops, from ``metrics/calcForDataset`` of the SalM² release) are not part of this repository.
Point ``SALMM_OFFICIAL_METRICS`` at a folder holding them (default: the authors' code beside
the project, ``../shared/reference/SaliencyMamba``); the tests skip, saying why, when neither is
there, a file is missing, or ``octave`` with the ``image`` package is not installed
(``apt-get install octave octave-image``).

Randomness: AUC-Judd's jitter comes from ``rand`` and AUC-Borji's splits from ``randi``.
The tests put their own ``rand.m`` and ``randi.m`` first on Octave's path; those hand out,
in order, the very numbers our code drew from its numpy Generator (recorded by a thin
wrapper), converting Borji's row-major 0-based indices to MATLAB's column-major 1-based
ones. Both sides therefore score the same jittered maps and the same random splits, and
every metric is compared to 1e-6, jitter included. A shadow errors out if asked for a draw
of another size or when none is left, so the draw order is checked too.

Octave's ``mean(zeros(1, 0))`` is empty where MATLAB's is NaN, so the official loop would
fail under Octave on a frame without fixations; the single-metric driver maps an empty
``NSS`` result to NaN, and the loop tests give every frame fixations.

Octave's ``imresize`` equals MATLAB's when enlarging (its cubic weights already sum to one),
which is the evaluation's case (model resolution -> 720x1280); it does not renormalise the
antialiasing kernel when shrinking, so shrinking is not compared here.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.datasets.matfile import write_fixdata
from salmm.evaluation import metrics as M
from salmm.evaluation.matlab_export import export_for_matlab
from tests._reference import official_metrics

log = logging.getLogger(__name__)

METRIC_FILES = ["AUC_Borji.m", "AUC_Judd.m", "NSS.m", "CC.m", "similarity.m", "KLdiv.m"]
LOOP_FILES = {
    "TrafficGaze": "calcForTrafficGaze.m",
    "DrFixD_rainy": "calcForDrFixDrainy.m",
    "BDDA": "calcForBDDA.m",
}
TOL = 1e-6


def _skip_reason() -> str | None:
    folder = official_metrics()
    if not folder:
        return ("SALMM_OFFICIAL_METRICS is not set and the authors' code is not beside the project"
                " (folder with the official metric .m files)")
    missing = [f for f in METRIC_FILES + list(LOOP_FILES.values()) if not Path(folder, f).is_file()]
    if missing:
        return f"SALMM_OFFICIAL_METRICS={folder} lacks {', '.join(missing)}"
    if shutil.which("octave-cli") is None and shutil.which("octave") is None:
        return "GNU Octave is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

SHADOW_RAND = """function r = rand(varargin)
  %% Replays the numbers the Python side drew, in order (test shadow of the builtin).
  global SALMM_RAND
  if isempty(SALMM_RAND), error('salmm:rand', 'rand: no recorded draw left'); end
  r = SALMM_RAND{1}; SALMM_RAND(1) = [];
  want = [varargin{:}];
  if ~isequal(size(r), want), error('salmm:rand', 'rand: recorded draw has another size'); end
end
"""

SHADOW_RANDI = """function r = randi(range, dims)
  %% Replays the indices the Python side drew, in order (test shadow of the core function).
  global SALMM_RANDI
  if isempty(SALMM_RANDI), error('salmm:randi', 'randi: no recorded draw left'); end
  r = SALMM_RANDI{1}; SALMM_RANDI(1) = [];
  if ~isequal(size(r), dims) || min(r(:)) < range(1) || max(r(:)) > range(2)
    error('salmm:randi', 'randi: recorded draw does not fit the request');
  end
end
"""


class RecordingRng:
    """Delegates to a numpy Generator and keeps every draw, for replay under Octave."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.rand: list[np.ndarray] = []
        self.randi: list[np.ndarray] = []

    def random(self, size):
        out = self._rng.random(size)
        self.rand.append(out)
        return out

    def integers(self, low, high, size):
        out = self._rng.integers(low, high, size=size)
        self.randi.append(out)
        return out

    def octave_queues(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The draws as Octave cell arrays; flat indices re-expressed for column-major maps."""
        rows, cols = np.divmod(np.stack(self.randi) if self.randi else np.zeros(0, int), shape[1])
        matlab_idx = (cols * shape[0] + rows + 1).astype(np.float64)
        return {
            "rand_queue": _cell(self.rand),
            "randi_queue": _cell(list(matlab_idx)),
        }


def _cell(items) -> np.ndarray:
    cell = np.empty((1, len(items)), dtype=object)
    for k, item in enumerate(items):
        cell[0, k] = np.asarray(item, dtype=np.float64)
    return cell


@pytest.fixture(scope="module")
def octave(tmp_path_factory):
    """Run an Octave script with the shadows and the official files on the path."""
    exe = shutil.which("octave-cli") or shutil.which("octave")
    shadow = tmp_path_factory.mktemp("octave_shadow")
    (shadow / "rand.m").write_text(SHADOW_RAND)
    (shadow / "randi.m").write_text(SHADOW_RANDI)
    official = official_metrics()

    def run(body: str, workdir: Path) -> str:
        script = workdir / "driver.m"
        script.write_text(
            "pkg load image;\n"
            f"addpath('{official}'); addpath('{shadow}');\n"
            "global SALMM_RAND SALMM_RANDI\n" + body
        )
        done = subprocess.run(
            [exe, "--no-gui", "--quiet", "--norc", str(script)],
            check=False,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"octave failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    probe = tmp_path_factory.mktemp("octave_probe")
    try:
        run("disp(corr2([1 2 3], [1 2 4]));", probe)
    except AssertionError as err:
        pytest.skip(f"octave cannot load the image package: {err}")
    return run


# --------------------------------------------------------------------------- single metrics


def _blobs(shape, centres, sigma):
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape)
    for r, c in centres:
        out += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
    return out


def _fix(rng, n, shape):
    pts = np.stack([rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)], axis=1)
    return M.fixation_map(pts, shape)


def _metric_cases():
    """(name, saliency, fixation map, label map); maps the official loop would see."""
    rng = np.random.default_rng(2024)
    shape = (45, 80)
    fix = _fix(rng, 30, shape)
    label = _blobs(shape, [(20, 30)], 6.0)
    blobs = _blobs(shape, [(18, 28), (30, 60)], 7.0) + 0.05 * rng.random(shape)
    low = rng.choice([0.0, 0.1, 0.3], size=shape)
    low[0, 0] = 1.0
    one_fix = np.zeros(shape)
    one_fix[10, 10] = 1
    big_fix = _fix(rng, 40, M.FIXATION_SHAPE)
    big_pred = _blobs((256, 256), [(100, 80), (150, 200)], 20.0) + 0.02 * rng.random((256, 256))
    return [
        ("blobs", M.minmax_normalize(blobs), fix, label),
        ("uniform noise", rng.random(shape), fix, rng.random(shape)),
        ("ties on a 0.1 grid", np.round(rng.random(shape) * 10) / 10, fix, label),
        ("three levels", rng.integers(0, 3, shape).astype(float), fix, label),
        ("split maxima 0.3", low, fix, label),
        ("zero label", blobs, fix, np.zeros(shape)),
        ("zero prediction", np.zeros(shape), fix, label),
        ("constant prediction", np.full(shape, 0.5), fix, label),
        ("no fixations", blobs, np.zeros(shape), label),
        ("one fixation", blobs, one_fix, label),
        # Smooth and positive, so bicubic enlargement does not overshoot below zero (KLdiv.m
        # would take the log of a negative number).
        ("enlarged 16x20", _blobs((16, 20), [(5, 6)], 4.0) + 0.5, fix, label),
        ("256x256 to 720x1280", M.minmax_normalize(big_pred), big_fix, None),
    ]


def _ours(sal, fix, label, rng):
    out = [
        M.auc_borji(sal, fix, rng=rng),
        M.auc_judd(sal, fix, rng=rng),
        M.nss(sal, fix),
    ]
    if label is None:
        return out + [math.nan] * 3
    return out + [M.cc(sal, label), M.similarity(sal, label), M.kl_divergence(sal, label)]


def _max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"NaN pattern differs: {a} vs {b}"
    both = ~np.isnan(a)
    return float(np.max(np.abs(a[both] - b[both]), initial=0.0))


def test_each_metric_matches_the_official_function(octave, tmp_path):
    cases = _metric_cases()
    variables: dict[str, object] = {"n_cases": float(len(cases))}
    ours = []
    for k, (_, sal, fix, label) in enumerate(cases, start=1):
        rng = RecordingRng(k)
        ours.append(_ours(sal, fix, label, rng))
        variables[f"sal_{k}"] = sal
        variables[f"fix_{k}"] = fix
        variables[f"lab_{k}"] = label if label is not None else np.zeros((0, 0))
        for key, queue in rng.octave_queues(fix.shape).items():
            variables[f"{key}_{k}"] = queue
    scipy.io.savemat(tmp_path / "cases.mat", variables)
    octave(
        """
d = load('cases.mat');
out = nan(d.n_cases, 6);
for k = 1:d.n_cases
  sal = d.(sprintf('sal_%d', k)); fix = d.(sprintf('fix_%d', k)); lab = d.(sprintf('lab_%d', k));
  SALMM_RAND = d.(sprintf('rand_queue_%d', k)); SALMM_RANDI = d.(sprintf('randi_queue_%d', k));
  out(k, 1) = AUC_Borji(sal, fix);
  out(k, 2) = AUC_Judd(sal, fix);
  nss = NSS(sal, fix);
  if isempty(nss), out(k, 3) = NaN; else out(k, 3) = mean(nss); end
  if ~isempty(lab)
    out(k, 4) = CC(sal, lab); out(k, 5) = similarity(sal, lab); out(k, 6) = KLdiv(sal, lab);
  end
  if ~isempty(SALMM_RAND) || ~isempty(SALMM_RANDI), error('case %d: draws left over', k); end
end
save('-v7', 'octave_out.mat', 'out');
""",
        tmp_path,
    )
    theirs = scipy.io.loadmat(tmp_path / "octave_out.mat")["out"]
    ours = np.array(ours)
    for j, metric in enumerate(M.METRIC_ORDER):
        diff = _max_abs_diff(ours[:, j], theirs[:, j])
        log.info("single metric parity %-5s max |ours - octave| = %.3g", metric, diff)
        assert diff <= TOL, (
            f"{metric}: max abs diff {diff} (ours {ours[:, j]}, octave {theirs[:, j]})"
        )
    # The cases really exercise the metrics: both sides agree on finite, varied scores.
    assert np.isfinite(ours[0]).all() and len({round(v, 6) for v in ours[:, 1]}) > 5


# --------------------------------------------------------------------------- official loops


def _dataset(name: str, rng: np.random.Generator):
    """Frames (name, pred, label), fixdata cells per video, fixations per frame (ours)."""
    if name == "BDDA":
        names = ["0001/0002.jpg", "0001/0003.jpg", "0017/0001.jpg"]
    else:
        names = ["01/000002.jpg", "01/000003.jpg", "02/000001.jpg"]
    frames, cells, points = [], {}, []
    for k, frame_name in enumerate(names):
        centre = (rng.uniform(8, 28), rng.uniform(10, 54))
        pred = _blobs((36, 64), [centre, (18, 32)], 5.0) + 0.03 * rng.random((36, 64))
        label = _blobs((36, 64), [(centre[0] + 2, centre[1] - 3)], 4.0)
        if k == 2:
            label = np.zeros((36, 64))  # a frame without gaze: the official loop scores NaN
        frames.append((frame_name, pred.astype(np.float32), label.astype(np.float32)))
        rows = rng.normal(centre[0] * 20, 40, 25).round()
        cols = rng.normal(centre[1] * 20, 60, 25).round()
        raw = np.stack([np.zeros(25), np.zeros(25), cols + 1, rows + 1], axis=1)  # 1-based
        raw[0, 3], raw[1, 2] = 721, 0  # outside the frame: dropped by both sides
        video, frame = (int(part) for part in frame_name[:9].split("/"))
        cells.setdefault(video, {})[frame] = raw
        points.append(raw[:, [3, 2]].astype(int) - 1)
    return frames, cells, points


@pytest.mark.parametrize("dataset", list(LOOP_FILES))
def test_official_loop_reads_our_export_and_agrees(octave, tmp_path, dataset):
    frames, cells, points = _dataset(dataset, np.random.default_rng(7))
    out_root, fix_dir = tmp_path / "outputMat", tmp_path / "fixdata"
    fix_dir.mkdir()
    export_for_matlab(out_root, frames, names_path=tmp_path / "test.mat")
    for video, by_frame in cells.items():
        last = max(by_frame)
        write_fixdata(
            fix_dir / f"fixdata{video}.mat",
            [by_frame.get(f, np.zeros((0, 4))) for f in range(1, last + 1)],
        )

    rng = RecordingRng(99)
    with_fixations = dataset != "BDDA"
    ours = [
        M.evaluate_frame(pred, label, pts if with_fixations else None, rng=rng)
        for (_, pred, label), pts in zip(frames, points, strict=True)
    ]
    scipy.io.savemat(tmp_path / "queues.mat", rng.octave_queues(M.FIXATION_SHAPE))
    function = LOOP_FILES[dataset][:-2]
    # Second argument: the fixdata prefix, or for BDDA the folder holding tar/.
    second = f"{fix_dir}/fixdata" if with_fixations else f"{out_root}/"
    stdout = octave(
        f"""
save_default_options('-v7');  % the script's save() then writes a MATLAB file, as in MATLAB
q = load('queues.mat'); SALMM_RAND = q.rand_queue; SALMM_RANDI = q.randi_queue;
{function}('{out_root}/', '{second}', '{tmp_path}/test.mat');
if ~isempty(SALMM_RAND) || ~isempty(SALMM_RANDI), error('draws left over'); end
""",
        tmp_path,
    )
    theirs = scipy.io.loadmat(out_root / "metrics.mat")
    columns = {
        "AUC_B": "auc_b_scores",
        "AUC_J": "auc_j_scores",
        "NSS": "NSS_scores",
        "CC": "CC_scores",
        "SIM": "Sim_scores",
        "KLD": "KLD_scores",
    }
    for metric, variable in columns.items():
        official = theirs[variable].ravel()
        if metric not in ours[0]:
            assert official.size == 0  # BDDA: the script leaves the AUC/NSS lists empty
            continue
        diff = _max_abs_diff([row[metric] for row in ours], official)
        log.info("%s loop parity %-5s max |ours - octave| = %.3g", dataset, metric, diff)
        assert diff <= TOL, f"{dataset} {metric}: max abs diff {diff}"

    # The printed dataset means are the plain means of those lists: NaN frames make NaN.
    printed = re.search(r"Ending Computing ---> (.*)", stdout)
    assert printed, stdout
    values = dict(re.findall(r"(\w+) (-?[\d.]+|NaN)", printed.group(1)))
    means = M.aggregate(ours).means
    names = {"AUC_B": "AUC_borji", "AUC_J": "AUC_judd", "NSS": "NSS", "CC": "CC", "SIM": "SIM"}
    names["KLD"] = "KLD"
    for metric, label in names.items():
        ours_mean = means.get(metric, math.nan)
        if math.isnan(ours_mean):
            assert values[label] == "NaN"
        else:
            assert abs(float(values[label]) - ours_mean) <= 0.5e-4 + 1e-9
    # The zero-gaze third frame makes CC/SIM/KLD NaN on both sides; the AUCs stay finite.
    assert math.isnan(means["CC"])
    if with_fixations:
        assert not math.isnan(means["AUC_J"])
