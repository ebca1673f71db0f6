"""Baselines, seed spread, per-video scores, bootstrap intervals, the comparison table and the
official-loop certification."""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.formats.prepared import PreparedDataset
from salmm.certify import main as certify_main
from salmm.compare import main as compare_main
from salmm.evaluate import main as evaluate_main
from salmm.evaluation import comparison as compare_module
from salmm.evaluation import metrics
from salmm.evaluation.baselines import centre_gaussian, centre_widths, fit_baseline
from salmm.evaluation.evaluator import evaluate
from salmm.evaluation.options import EvalOptions
from tests._inference_data import InferenceData, inference_data, write_prepared
from tests._reference import official_metrics
from tests.test_write_faults import Faults

SPLITS = {"train": [(1, 2), (2, 2)], "test": [(1, 3), (2, 3), (3, 3)]}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared TrafficGaze-style dataset with train and test splits and a test CLIP cache,
    the raw fixdata folder's parent)."""
    root = tmp_path_factory.mktemp("evaltools")
    write_prepared(root / "prepared", "trafficgaze", SPLITS, cache_split="test",
                   fixdata=root / "raw" / "fixdata")
    return root / "prepared", root / "raw"


def _evaluate(prepared: Path, out: Path, **kwargs) -> dict:
    return evaluate(EvalOptions(checkpoint=kwargs.pop("checkpoint", None), prepared=str(prepared),
                                out=str(out), workers=0, **kwargs))


def test_centre_fit_by_hand():
    mean = np.zeros((5, 7))
    mean[2, 3] = 2.0                       # the centre: no spread
    mean[0, 3] = mean[4, 3] = 1.0          # two rows away, above and below
    sy, sx = centre_widths(mean)
    assert sy == pytest.approx(math.sqrt((4 + 4) / 4))
    assert sx == 0.0
    gauss = centre_gaussian((3, 5), 1.0, 2.0)
    assert gauss[1, 2] == 1.0
    assert gauss[0, 2] == pytest.approx(math.exp(-0.5))
    assert gauss[1, 0] == pytest.approx(math.exp(-4 / 8))
    assert gauss[0, 0] == pytest.approx(math.exp(-0.5 - 0.5))


def test_uniform_scores_by_hand():
    label = np.array([[0.0, 1.0], [0.0, 3.0]])
    fix = np.array([[0, 0]])
    got = metrics.uniform_scores(label, fix)
    q = np.array([0, 1 / 3, 0, 1.0]) / (4 / 3)      # min-max then sum 1 (SIM)
    assert got["AUC_B"] == got["AUC_J"] == 0.5 and got["NSS"] == 0.0 and got["CC"] == 0.0
    assert got["SIM"] == pytest.approx(np.minimum(0.25, q).sum())
    p = np.array([0, 1 / 3, 0, 1.0]) / (4 / 3)       # KLD: min-max label, sum 1
    eps = np.finfo(float).eps
    assert got["KLD"] == pytest.approx(float(np.sum(p * np.log(eps + p / (0.25 + eps)))))
    assert list(metrics.uniform_scores(label, None)) == ["CC", "SIM", "KLD"]
    assert math.isnan(metrics.uniform_scores(np.zeros((2, 2)), None)["CC"])


def test_baselines_are_fitted_deterministically_on_the_train_labels(prepared):
    root, _ = prepared
    mean = fit_baseline("mean", PreparedDataset.open(root))
    from salmm.evaluation.baselines import mean_label
    want, frames = mean_label(PreparedDataset.open(root))
    assert frames == 4 and mean.fit["frames"] == 4 and mean.fit["split"] == "train"
    np.testing.assert_array_equal(mean.map, want)
    first, second = (fit_baseline("center", PreparedDataset.open(root)) for _ in range(2))
    assert first.fit == second.fit and first.fit["sigma_y_px"] > 0
    np.testing.assert_array_equal(first.map, second.map)
    assert first.map.max() == pytest.approx(1.0, abs=0.02)


def test_baselines_through_the_evaluator(prepared, tmp_path: Path):
    root, _ = prepared
    uniform = _evaluate(root, tmp_path / "u", baseline="uniform")
    assert uniform["means"]["AUC_B"] == 0.5 and uniform["means"]["CC"] == 0.0
    assert uniform["predictor"] == "uniform baseline" and uniform["checkpoint"] is None
    center = _evaluate(root, tmp_path / "c", baseline="center")
    assert center["baseline"]["fit"]["frames"] == 4
    assert center["means"]["CC"] > 0.3                       # the blobs sit near the centre
    assert "center baseline on trafficgaze test" in (tmp_path / "c" / "results.md").read_text()


def test_seed_spread_extends_the_single_numbers_exactly(prepared, tmp_path: Path):
    root, _ = prepared
    single = _evaluate(root, tmp_path / "one", baseline="center")
    assert single["spread"] is None
    three = _evaluate(root, tmp_path / "three", baseline="center", seeds=3)
    shifted = _evaluate(root, tmp_path / "shifted", baseline="center", seed=1)
    for m in ("AUC_B", "AUC_J"):
        per_seed = three["spread"]["metrics"][m]["per_seed"]
        assert per_seed[0] == single["means"][m]            # --seeds 1 is today's number
        assert per_seed[1] == shifted["means"][m]           # seed k is --seed k
        assert three["spread"]["metrics"][m]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert three["means"] == single["means"]
    assert three["spread"]["metrics"]["AUC_B"]["std"] > 0
    assert " ± " in (tmp_path / "three" / "results.md").read_text()


def test_per_video_scores_best_worst_and_bootstrap(prepared, tmp_path: Path):
    root, _ = prepared
    summary = _evaluate(root, tmp_path / "b", baseline="center", bootstrap=300)
    with open(tmp_path / "b" / "per_frame.csv") as f:
        frames = list(csv.DictReader(f))
    with open(tmp_path / "b" / "per_video.csv") as f:
        videos = list(csv.DictReader(f))
    assert [v["video"] for v in videos] == ["1", "2", "3"]
    for video in videos:
        members = [float(r["CC"]) for r in frames if r["video"] == video["video"]]
        assert int(video["frames"]) == len(members) == 3
        assert float(video["CC"]) == pytest.approx(np.mean(members), abs=1e-15)
    ranked = summary["videos"]
    ccs = {v["video"]: float(v["CC"]) for v in videos}
    assert ranked["best"][0]["video"] == max(ccs, key=ccs.get)
    assert ranked["worst"][0]["video"] == min(ccs, key=ccs.get)
    assert not {v["video"] for v in ranked["best"]} & {v["video"] for v in ranked["worst"]}
    interval = summary["bootstrap"]["intervals"]["CC"]
    ulp = 1e-12                       # a mean of three equal values may round one ulp away
    assert min(ccs.values()) - ulp <= interval[0] <= summary["means"]["CC"] <= interval[1] \
        <= max(ccs.values()) + ulp
    again = _evaluate(root, tmp_path / "b2", baseline="center", bootstrap=300)
    assert again["bootstrap"] == summary["bootstrap"]         # seeded: reproducible


def test_evaluate_needs_a_checkpoint_or_a_baseline(prepared, capsys):
    root, _ = prepared
    for argv in ([], ["--checkpoint", "x.pt", "--baseline", "mean"]):
        with pytest.raises(SystemExit) as stop:
            evaluate_main(["--prepared", str(root), "--out", "o", *argv])
        assert stop.value.code == 2
    assert "give --checkpoint or --baseline" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


def test_compare_table_every_predictor_on_every_dataset(prepared, data: InferenceData,
                                                       tmp_path: Path, monkeypatch,
                                                       caplog: pytest.LogCaptureFixture):
    root, _ = prepared
    second = tmp_path / "bdda"
    write_prepared(second, "bdda", {"train": [(4, 2)], "test": [(5, 3), (6, 2)]},
                   cache_split="test")
    out = tmp_path / "cmp"
    argv = ["--checkpoint", str(data.trainer), "--baseline", "center", "--baseline", "uniform",
            "--prepared", str(root), "--prepared", str(second), "--out", str(out),
            "--cached-clip", "--workers", "0", "--seeds", "2"]
    assert compare_main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert len(result["cells"]) == 6
    cells = {(c["predictor"], c["dataset"]): c for c in result["cells"]}
    model = cells[("last.pt", "trafficgaze")]
    assert model["checkpoint_sha256"] == json.loads((out / "runs" / "last" / "trafficgaze" /
                                                      "summary.json").read_text())[
        "checkpoint"]["sha256"]
    assert model["version_id"] == result["datasets"][0]["version_id"]
    assert set(cells[("center baseline", "bdda")]["values"]) == {"CC", "SIM", "KLD"}
    table = (out / "comparison.md").read_text()
    header = table.splitlines()[2]
    assert header.startswith("| | trafficgaze AUC_B | trafficgaze AUC_J | trafficgaze NSS |"
                             " trafficgaze CC | trafficgaze SIM | trafficgaze KLD | bdda CC |")
    assert "| uniform baseline | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.0000 | 0.0000 |" in table
    assert "uniform baseline (a constant map: nothing fitted)" in table
    assert "center baseline (fitted on each dataset's train labels)" in table
    assert "AUC_B, AUC_J, NSS are left out of the columns of datasets without them" in table
    undefined = {m for c in result["cells"] for m in c["undefined"]}
    if undefined:                  # defined-frame means, starred, never a row of NaN
        assert "\\* the mean over the frames where the metric is defined" in table
    model_row = next(line for line in table.splitlines() if line.startswith("| last.pt |"))
    assert "NaN" not in model_row
    with open(out / "comparison.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 * 6 + 3 * 3
    assert {row["version_id"] for row in lines} == {d["version_id"] for d in result["datasets"]}

    calls = []
    monkeypatch.setattr(compare_module, "evaluate", lambda opts: calls.append(opts))
    assert compare_main(argv) == 0                      # every cell is there: all reused
    assert calls == []
    assert json.loads((out / "comparison.json").read_text()) == result


def test_compare_table_across_the_five_datasets(prepared, data: InferenceData, tmp_path: Path):
    """The cross-dataset view: one checkpoint and the baselines on all five benchmarks."""
    root, _ = prepared
    # small video numbers: write_prepared's label blob moves with the video number
    others = {"drfixd-rainy": [(7, 2)], "bdda": [(4, 2)], "dreyeve": [(5, 2)], "dada": [(6, 2)]}
    argv = ["--checkpoint", str(data.trainer), "--baseline", "center", "--baseline", "uniform",
            "--prepared", str(root)]
    for dataset, test in others.items():
        write_prepared(tmp_path / dataset, dataset, {"train": [(3, 2)], "test": test},
                       cache_split="test")
        argv += ["--prepared", str(tmp_path / dataset)]
    out = tmp_path / "cmp"
    assert compare_main([*argv, "--out", str(out), "--cached-clip", "--workers", "0"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    names = ["trafficgaze", "drfixd-rainy", "bdda", "dreyeve", "dada"]
    assert [d["dataset"] for d in result["datasets"]] == names
    assert len(result["cells"]) == 3 * 5
    table = (out / "comparison.md").read_text().splitlines()
    header = table[2]
    for dataset in names:
        assert f"{dataset} CC" in header and f"{dataset} KLD" in header
    # DR(eye)VE has gaze maps only: no fixation metrics; DADA-2000's fixation maps give them
    assert "dreyeve NSS" not in header and "dreyeve AUC_J" not in header
    assert "| dada AUC_B | dada AUC_J | dada NSS | dada CC | dada SIM | dada KLD |" in header
    # DR(eye)VE's own metrics beside the official six, explained under the table
    assert "| dreyeve CC | dreyeve SIM | dreyeve KLD | dreyeve CC† | dreyeve KLD† | dreyeve IG† |" \
        in header and "dada IG†" not in header
    assert any(line.startswith("† the dataset's own benchmark metrics: dreyeve: DR(eye)VE")
               for line in table)
    rows = [line for line in table if line.startswith(("| last.pt", "| center baseline",
                                                       "| uniform baseline"))]
    assert len(rows) == 3
    columns = header.count("|") - 1
    assert all(row.count("|") - 1 == columns for row in rows)
    assert "NaN" not in "".join(rows[:2])
    # the authors' CC of a constant map is NaN (np.corrcoef's 0/0); the official six give 0
    uniform = rows[2].split(" | ")
    assert uniform[header.split(" | ").index("dreyeve CC†")] == "NaN"
    cells = {(c["predictor"], c["dataset"]): c for c in result["cells"]}
    assert cells[("last.pt", "dreyeve")]["protocol"]["means"]["CC"] == pytest.approx(
        cells[("last.pt", "dreyeve")]["values"]["CC"], abs=1e-3)    # one r, two conventions
    for dataset in names:
        values = cells[("uniform baseline", dataset)]["values"]
        assert values["CC"] == 0.0 and values["KLD"] > 0
        assert cells[("center baseline", dataset)]["values"]["CC"] > values["CC"] or \
            dataset == "drfixd-rainy"       # its one training video sits off-centre


def test_compare_bad_input_one_line(prepared, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture):
    root, _ = prepared
    with caplog.at_level(logging.ERROR):
        assert compare_main(["--checkpoint", str(tmp_path / "nope.pt"), "--prepared", str(root),
                             "--out", str(tmp_path / "o")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'nope.pt'}: no such checkpoint: give")


def test_certify_refuses_what_is_not_an_export(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR):
        assert certify_main(["--export", str(tmp_path), "--official-metrics",
                             str(tmp_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not an export of python -m salmm.evaluate" in errors[0]


def _official() -> str | None:
    folder = official_metrics()
    if not folder or not Path(folder, "calcForTrafficGaze.m").is_file():
        return None
    if shutil.which("octave-cli") is None and shutil.which("octave") is None:
        return None
    return folder


@pytest.mark.skipif(_official() is None, reason="needs SALMM_OFFICIAL_METRICS (the official .m"
                    " files) and GNU Octave")
def test_certify_runs_the_official_loop_and_agrees(prepared, tmp_path: Path):
    root, raw = prepared
    export = tmp_path / "mat"
    _evaluate(root, tmp_path / "c", baseline="center", export_mat=str(export), seeds=3)
    assert certify_main(["--export", str(export), "--official-metrics", str(_official()),
                         "--root", str(raw)]) == 0
    out = (export / "certificate.md").read_text()
    assert "CERTIFIED" in out and "NOT CERTIFIED" not in out
    exact = float(out.split("NSS, CC, SIM, KLD: ")[1].split()[0])
    assert exact <= 1e-6


@pytest.mark.skipif(_official() is None, reason="needs SALMM_OFFICIAL_METRICS (the official .m"
                    " files) and GNU Octave")
def test_fixations_on_the_last_row_and_column_count_as_the_official_loop_counts_them(
        tmp_path: Path):
    """Raw points on row 720 and column 1280 (1-based: the frame's last pixel row and column):
    the official loop marks them, the Python loader (training labels) does not; salmm's
    fixation metrics must agree with the loop frame by frame."""
    edge = np.array([[720.0, 1280.0], [720.0, 640.0], [360.0, 1280.0]])
    root, _ = write_prepared(tmp_path / "prepared", "trafficgaze", SPLITS, cache_split="test",
                             fixdata=tmp_path / "raw" / "fixdata", edge_points=edge)
    export = tmp_path / "mat"
    _evaluate(root, tmp_path / "e", baseline="center", export_mat=str(export))
    assert certify_main(["--export", str(export), "--official-metrics", str(_official()),
                         "--root", str(tmp_path / "raw")]) == 0
    assert "CERTIFIED" in (export / "certificate.md").read_text()


HOSTILE = "x'); system('touch PWNED'); (' \"%s;\nsecond line"
"""A folder name that is Octave code between single quotes, with a newline in it."""

FAKE_ENGINE = """#!{python}
import csv, json, os, sys
import numpy as np, scipy.io
driver = open(sys.argv[-1]).read()
paths = {{k: os.environ[k] for k in ("SALMM_OFFICIAL", "SALMM_EXPORT", "SALMM_SECOND",
                                    "SALMM_TEST")}}
json.dump({{"argv": sys.argv, "driver": driver, "paths": paths}}, open(os.environ["SALMM_LOG"], "w"))
# a stand-in for the official loop: salmm's own per-frame scores, saved where the loop saves them
record = json.load(open(paths["SALMM_EXPORT"] + "salmm.json"))
with open(os.path.join(record["results"], "per_frame.csv")) as f:
    rows = list(csv.DictReader(f))
names = {variables}
scipy.io.savemat(paths["SALMM_EXPORT"] + "metrics.mat",
                 {{v: np.array([float(r[m]) for r in rows]) for m, v in names.items()}})
"""


def test_certify_passes_paths_to_the_engine_as_data_never_as_source(
        prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    from salmm.evaluation import certification

    root, raw = prepared
    hostile = tmp_path / HOSTILE
    export = hostile / "mat"
    _evaluate(root, hostile / "eval", baseline="center", export_mat=str(export))
    official = hostile / "official"
    official.mkdir()
    for name in ("calcForTrafficGaze", "AUC_Borji", "AUC_Judd", "NSS", "CC", "similarity",
                 "KLdiv"):
        (official / f"{name}.m").write_text("% stand-in\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    engine = bin_dir / "octave-cli"
    engine.write_text(FAKE_ENGINE.format(python=sys.executable,
                                         variables=repr(dict(certification.VARIABLES))))
    engine.chmod(0o755)
    raw_copy = hostile / "raw"
    shutil.copytree(raw, raw_copy)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SALMM_LOG", str(tmp_path / "engine.json"))
    assert certify_main(["--export", str(export), "--official-metrics", str(official),
                         "--root", str(raw_copy), "--engine", "octave"]) == 0
    seen = json.loads((tmp_path / "engine.json").read_text())
    assert HOSTILE not in seen["driver"] and "'); system(" not in seen["driver"]
    assert "system" not in seen["driver"] and not any(HOSTILE in arg for arg in seen["argv"])
    assert seen["paths"] == {"SALMM_OFFICIAL": str(official), "SALMM_EXPORT": f"{export}/",
                             "SALMM_SECOND": f"{raw_copy}/fixdata/fixdata",
                             "SALMM_TEST": f"{export}/test.mat"}
    assert "CERTIFIED" in (export / "certificate.md").read_text()
    assert not list(tmp_path.rglob("PWNED"))

    # the certificate cannot be written: one line, exit 1, the old certificate left whole
    before = (export / "certificate.md").read_text()
    Faults(monkeypatch, export, errno.ENOSPC, "certificate.md*")
    with caplog.at_level(logging.INFO):
        status = certify_main(["--export", str(export), "--official-metrics", str(official),
                               "--root", str(raw_copy), "--engine", "octave"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    want = f"{export}/certificate.md: cannot be written (No space left on device)"
    assert status == 1 and errors == [want]
    assert (export / "certificate.md").read_text() == before


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_best_and_worst_videos_never_overlap(count):
    from salmm.evaluation.statistics import ranked_videos

    videos = [{"video": str(k), "frames": 1, "CC": cc} for k, cc in
              enumerate([0.3, 0.9, float("nan"), 0.1, 0.5, 0.7, 0.2][:count])]
    ranked = ranked_videos(videos)
    scored = sorted((v for v in videos if v["CC"] == v["CC"]), key=lambda v: -v["CC"])
    best, worst = [v["video"] for v in ranked["best"]], [v["video"] for v in ranked["worst"]]
    assert not set(best) & set(worst)
    assert best == [v["video"] for v in scored[:len(best)]]
    assert worst == [v["video"] for v in scored[::-1][:len(worst)]]
    assert len(best) + len(worst) == min(len(scored), 6)
