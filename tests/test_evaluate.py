"""``python -m salmm.evaluate`` on a synthetic TrafficGaze dataset prepared with the real commands.

The test split has 4 frames: by construction of the synthetic data one has no fixation (every
metric NaN: the label is constant), one has a single fixation (AUC-Borji NaN, as the official
code) and two are ordinary.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import BadInputError
from pipeline.datasets.readers import fixation_points
from pipeline.formats.labels import matlab_points
from pipeline.formats.shards import decode_npy, encode_npy
from salmm.evaluate import main
from salmm.evaluation import matlab_export
from salmm.evaluation.evaluator import evaluate
from salmm.evaluation.metrics import METRIC_ORDER, fixation_map
from salmm.evaluation.options import EvalOptions
from salmm.model.loading import FROM_CHECKPOINT, resolve_clip
from tests._inference_data import (
    InferenceData,
    fixation_count,
    inference_data,
    write_bdda_prepared,
)
from tests._prepared import run_module, write_fake_cache, write_prepared

CLIP_NONE = (("clip_pretrained", None),)   # the official checkpoint's CLIP, random weights


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> InferenceData:
    return inference_data(tmp_path_factory)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_scores(a: list[dict[str, str]], b: list[dict[str, str]], metrics: tuple[str, ...]):
    """Same frames, and the same scores up to float rounding: the model's convolutions round
    differently with another torch thread count, so the last digits may differ."""
    assert [row["key"] for row in a] == [row["key"] for row in b]
    for row_a, row_b in zip(a, b):
        for m in metrics:
            np.testing.assert_allclose(float(row_a[m]), float(row_b[m]), rtol=1e-5, atol=1e-5,
                                       equal_nan=True, err_msg=f"{row_a['key']} {m}")


@pytest.fixture(scope="module")
def cli_run(data: InferenceData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command, as a user runs it: trainer checkpoint, cached CLIP, 2 metric workers,
    .mat export."""
    work = tmp_path_factory.mktemp("evaluate-cli")
    result = run_module("salmm.evaluate", "--checkpoint", str(data.trainer), "--prepared",
                        str(data.prepared), "--split", "test", "--out", str(work / "out"),
                        "--export-mat", str(work / "mat"), "--cached-clip", "--workers", "2",
                        "--batch-size", "3", "--seed", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    (work / "stderr.txt").write_text(result.stderr)
    return work


def test_csv_has_one_row_per_frame_with_the_expected_scores(cli_run: Path, data: InferenceData):
    rows = read_csv(cli_run / "out" / "per_frame.csv")
    samples = data.test_samples()
    assert list(rows[0]) == ["index", "key", "name", "video", "frame", *METRIC_ORDER]
    assert [r["key"] for r in rows] == [s["key"] for s in samples]
    assert [r["name"] for r in rows] == [s["name"] for s in samples]
    assert [r["index"] for r in rows] == [str(i) for i in range(len(samples))]
    counts = [fixation_count(s["fixations"]) for s in samples]
    assert sorted(min(c, 2) for c in counts) == [0, 1, 2, 2]    # the cases the data promises
    for row, count in zip(rows, counts):
        scores = {m: float(row[m]) for m in METRIC_ORDER}
        if count == 0:       # constant label and no fixations: every metric NaN, as MATLAB
            assert all(math.isnan(v) for v in scores.values()), row
            continue
        nan = {m for m, v in scores.items() if math.isnan(v)}
        assert nan == ({"AUC_B"} if count == 1 else set()), row
        assert 0 <= scores["AUC_J"] <= 1 and -1 <= scores["CC"] <= 1
        assert 0 <= scores["SIM"] <= 1 and scores["KLD"] >= 0
        if count > 1:
            assert 0 <= scores["AUC_B"] <= 1


def test_summary_matches_the_csv(cli_run: Path, data: InferenceData):
    out = cli_run / "out"
    summary = json.loads((out / "summary.json").read_text())
    rows = read_csv(out / "per_frame.csv")
    assert summary["n_frames"] == len(rows) == 4
    assert summary["metrics"] == list(METRIC_ORDER)
    for m in METRIC_ORDER:
        column = np.array([float(r[m]) for r in rows])
        assert summary["nan_frames"][m] == int(np.isnan(column).sum())
        official = summary["means"][m]
        if np.isnan(column).any():
            assert official is None                       # NaN mean, as MATLAB's mean()
        else:
            assert official == column.mean()
        assert summary["means_without_nan"][m] == pytest.approx(np.nanmean(column), abs=0,
                                                                rel=1e-15)
    assert summary["outputs"]["csv"]["sha256"] == hashlib.sha256(
        (out / "per_frame.csv").read_bytes()).hexdigest()
    assert summary["dataset"]["version_id"] == data.version
    assert summary["dataset"]["split"] == "test"
    assert summary["checkpoint"]["sha256"] == hashlib.sha256(data.trainer.read_bytes()).hexdigest()
    assert summary["checkpoint"]["kind"] == "salmm-train"
    assert summary["clip"]["mode"] == "cached"
    assert summary["clip"]["cache_identity"]["prepared"]["version_id"] == data.version
    assert summary["clip"]["cache_identity"]["encoder"]["weights"] == "random-seed0"
    assert summary["seed"] == 3 and summary["jitter"] is True


def test_table_follows_the_paper_and_is_logged(cli_run: Path):
    table = (cli_run / "out" / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == \
        ["AUC_B", "AUC_J", "NSS", "CC", "SIM", "KLD"]
    rows = [line for line in table.splitlines() if line.startswith("| trafficgaze test")]
    assert rows and "NaN" not in rows[0]        # first: the defined frames' means
    logged = (cli_run / "stderr.txt").read_text()
    assert header in logged and all(row in logged for row in rows)
    assert logged.count(header) == 1            # the table is printed once


def test_export_round_trips_through_loadmat(cli_run: Path, data: InferenceData):
    mat = cli_run / "mat"
    samples = data.test_samples()
    names = matlab_export.read_name_list(mat / "test.mat")
    assert names == [s["name"] for s in samples] == [f"03/00000{i}.jpg" for i in range(6, 10)]
    for sample in samples:
        pred, label = matlab_export.read_frame(mat, sample["name"])
        assert pred.shape == label.shape == (64, 64)
        assert pred.dtype == label.dtype == np.float32
        assert np.all((pred > 0) & (pred < 1))
        np.testing.assert_array_equal(label, sample["label"])


def test_scores_do_not_depend_on_workers_or_checkpoint_format(cli_run: Path, data: InferenceData,
                                                              tmp_path: Path):
    """Same weights as the official release format, scored in this process (no pool): the
    same numbers as the trainer checkpoint scored by two worker processes."""
    summary = evaluate(EvalOptions(checkpoint=str(data.official), prepared=str(data.prepared),
                                   out=str(tmp_path / "out"), cached_clip=True, workers=0,
                                   batch_size=3, seed=3, clip=CLIP_NONE))
    assert summary["checkpoint"]["kind"] == "official"
    assert summary["checkpoint"]["epoch"] == 5
    assert_same_scores(read_csv(tmp_path / "out" / "per_frame.csv"),
                       read_csv(cli_run / "out" / "per_frame.csv"),
                       ("AUC_B", "AUC_J", "NSS", "CC", "SIM", "KLD"))


def test_frames_scored_on_a_dask_cluster_get_the_same_numbers(cli_run: Path,
                                                             data: InferenceData, tmp_path: Path,
                                                             dask_cluster):
    summary = evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(data.prepared),
                                   out=str(tmp_path), cached_clip=True, batch_size=3, seed=3,
                                   dask_address=dask_cluster.scheduler_address))
    assert summary["n_frames"] == 4
    assert_same_scores(read_csv(tmp_path / "per_frame.csv"),
                       read_csv(cli_run / "out" / "per_frame.csv"),
                       ("AUC_B", "AUC_J", "NSS", "CC", "SIM", "KLD"))


def test_seed_and_jitter_change_only_the_random_metrics(cli_run: Path, data: InferenceData,
                                                        tmp_path: Path):
    evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(data.prepared),
                         out=str(tmp_path), cached_clip=True, batch_size=3, seed=4,
                         jitter=False))
    before = read_csv(cli_run / "out" / "per_frame.csv")
    after = read_csv(tmp_path / "per_frame.csv")
    assert_same_scores(before, after, ("NSS", "CC", "SIM", "KLD"))
    finite = [(float(a["AUC_B"]), float(b["AUC_B"])) for a, b in zip(before, after)
              if a["AUC_B"] != "nan"]
    assert finite and all(abs(x - y) > 1e-4 for x, y in finite)


def test_inline_clip_gives_the_cached_scores(cli_run: Path, data: InferenceData, tmp_path: Path):
    """Without --cached-clip the model runs the CLIP the checkpoint names (random, seed 0):
    the same embeddings as the cache, so the same scores up to float rounding."""
    summary = evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(data.prepared),
                                   out=str(tmp_path), batch_size=3, seed=3))
    assert summary["clip"]["mode"] == "inline"
    assert summary["clip"]["options"]["pretrained"] is None
    cached = read_csv(cli_run / "out" / "per_frame.csv")
    inline = read_csv(tmp_path / "per_frame.csv")
    for a, b in zip(cached, inline):
        for m in METRIC_ORDER:
            assert float(b[m]) == pytest.approx(float(a[m]), rel=1e-4, abs=1e-6, nan_ok=True)


# ---- refusals ----------------------------------------------------------------------------------


def options(data: InferenceData, tmp_path: Path, **changes) -> EvalOptions:
    base = {"checkpoint": str(data.trainer), "prepared": str(data.prepared),
            "out": str(tmp_path / "out"), "cached_clip": True}
    return EvalOptions(**{**base, **changes})


def refusal(opts: EvalOptions) -> str:
    with pytest.raises(BadInputError) as info:
        evaluate(opts)
    message = str(info.value)
    assert "\n" not in message
    assert not Path(opts.out).exists()      # nothing written, let alone presented as complete
    return message


def test_missing_checkpoint(data: InferenceData, tmp_path: Path):
    missing = tmp_path / "nope.tar"
    assert refusal(options(data, tmp_path, checkpoint=str(missing))).startswith(
        f"{missing}: no such checkpoint: give a checkpoint file, a folder")


def test_checkpoint_with_wrong_keys(data: InferenceData, tmp_path: Path):
    bad = tmp_path / "model_best_other.tar"
    torch.save({"epoch": 1, "state_dict": {"encoder1.0.weight": torch.zeros(8, 3, 3, 3),
                                           "head.weight": torch.zeros(2)}}, bad)
    message = refusal(options(data, tmp_path, checkpoint=str(bad)))
    assert message.startswith(f"{bad}: state_dict does not match SalMM")
    assert "head.weight" in message and "missing" in message


def test_prepared_without_manifest(data: InferenceData, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = refusal(options(data, tmp_path, prepared=str(empty)))
    assert message.startswith(f"{empty}/manifest.json: missing")


def test_unknown_split(data: InferenceData, tmp_path: Path):
    message = refusal(options(data, tmp_path, split="tset"))
    assert message == (f"{data.prepared}/manifest.json: no split 'tset' (has test, train,"
                       " valid)")


def test_cache_of_another_dataset_version(data: InferenceData, tmp_path: Path):
    other = write_prepared(tmp_path / "other", {"test": [4]}, size=(64, 64))
    cache = write_fake_cache(other, tmp_path / "other.zarr")
    message = refusal(options(data, tmp_path, cache=str(cache)))
    assert message.startswith(f"{cache}: made from prepared dataset version")
    assert f"the prepared dataset is version {data.version}" in message


def test_cache_without_the_split(data: InferenceData, tmp_path: Path):
    message = refusal(options(data, tmp_path, split="valid"))
    assert message == (f"{data.cache}: has no embeddings of split 'valid' (has test); run"
                       " `python -m pipeline embed --split valid`")


def test_clip_options_must_match_the_checkpoint():
    trained = {"clip_model": "ViT-B-32", "clip_pretrained": None, "profile": "salmm"}
    unset = dict.fromkeys(trained, FROM_CHECKPOINT)
    assert resolve_clip("ck.pt", trained, unset).pretrained is None
    with pytest.raises(BadInputError, match=r"^ck.pt: trained with CLIP weights none \(random\)"):
        resolve_clip("ck.pt", trained, {**unset, "clip_pretrained": "openai"})
    with pytest.raises(BadInputError, match="^ck.pt: trained with --profile salmm, not openclip"):
        resolve_clip("ck.pt", trained, {**unset, "profile": "openclip"})
    # an official checkpoint: the published CLIP unless told otherwise
    published = resolve_clip("model_best.tar", None, unset)
    assert (published.model, published.pretrained, published.profile) == \
        ("ViT-B-32", "openai", "salmm")


def test_command_reports_one_line_and_exit_code_2(data: InferenceData, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture):
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.ERROR, logger="salmm.evaluate"):
        code = main(["--checkpoint", str(data.trainer), "--prepared", str(empty),
                     "--out", str(tmp_path / "out"), "--cached-clip"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"{empty}/manifest.json: missing")


# ---- conventions -------------------------------------------------------------------------------


def test_fixation_points_follow_the_official_matlab_loop():
    """Raw fixdata values (1-based, as recorded) -> reader -> shard -> the map MATLAB builds
    with ``fix_map(x, y) = 1`` for ``0 < x < 721``, ``0 < y < 1281``."""
    raw_rows = np.array([1, 2, 360, 719, 5, 0, 720, 721])
    raw_cols = np.array([1, 640, 1279, 3, 0, 9, 1280, 5])
    cell = np.stack([np.zeros(8), np.zeros(8), raw_cols, raw_rows], axis=1).astype(float)
    points, _ = fixation_points(cell)
    stored = decode_npy(encode_npy(points))                  # what the shard holds
    ours = fixation_map(matlab_points(stored))
    matlab = np.zeros((720, 1280))
    for x, y in zip(raw_rows, raw_cols):                    # the loop, 1-based
        if 0 < x < 721 and 0 < y < 1281:
            matlab[x - 1, y - 1] = 1
    np.testing.assert_array_equal(ours, matlab)
    assert ours.sum() == 5 and ours[719, 1279] == 1         # row 720, column 1280 count here


def test_bdda_reports_cc_sim_kld_only(data: InferenceData, tmp_path: Path):
    prepared, cache = write_bdda_prepared(tmp_path / "bdda")
    summary = evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(prepared),
                                   out=str(tmp_path / "out"), export_mat=str(tmp_path / "mat"),
                                   cached_clip=True, cache=str(cache)))
    assert summary["metrics"] == ["CC", "SIM", "KLD"]
    assert all(np.isfinite(v) for v in summary["means"].values())
    rows = read_csv(tmp_path / "out" / "per_frame.csv")
    assert list(rows[0]) == ["index", "key", "name", "video", "frame", "CC", "SIM", "KLD"]
    assert "| bdda test | - | - | - |" in (tmp_path / "out" / "results.md").read_text()
    assert matlab_export.read_name_list(tmp_path / "mat" / "test.mat") == \
        ["0017/0001.jpg", "0017/0002.jpg", "0017/0003.jpg"]


def test_a_failed_run_leaves_nothing_that_reads_as_complete(data: InferenceData, tmp_path: Path):
    """A shard that breaks after some frames were scored: no CSV, no name list, and the
    summary of an earlier run in the same folder is gone (it would read as this run's)."""
    prepared = tmp_path / "prepared"
    shutil.copytree(data.prepared, prepared)
    (prepared / "test-000001.tar").write_bytes(b"\0" * 100)    # the second of two test shards
    out, mat = tmp_path / "out", tmp_path / "mat"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(BadInputError, match="test-000001.tar"):
        evaluate(EvalOptions(checkpoint=str(data.trainer), prepared=str(prepared), out=str(out),
                             export_mat=str(mat), cached_clip=True, batch_size=2))
    assert list(out.iterdir()) == []
    assert (mat / "pre").is_dir() and not (mat / "test.mat").exists()
