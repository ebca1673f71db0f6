"""Synthetic raw datasets: real layouts, readable by the readers, deterministic, dashcam-like."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from pipeline.cli import build_parser, main
from pipeline.core.errors import BadInputError
from pipeline.datasets import read_frames
from pipeline.datasets.matfile import load_fixdata
from pipeline.datasets.splits import read_split
from pipeline.formats.images import decode_gray, decode_rgb
from pipeline.formats.labels import fixation_label, fixation_label_reference, loader_points
from pipeline.synth import write_dataset

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("dataset", ["trafficgaze", "drfixd-rainy"])
def test_fixdata_layout(synth_dataset, dataset):
    root = synth_dataset(dataset)
    assert "SYNTHETIC" in (root / "SYNTHETIC.txt").read_text()
    assert sorted(p.name for p in (root / "trafficframe").iterdir()) == ["01", "02", "03"]
    assert sorted(p.name for p in (root / "trafficframe" / "02").iterdir()) == [
        f"{n:06d}.jpg" for n in range(1, 9)]
    assert sorted(p.name for p in (root / "fixdata").iterdir()) == [
        "fixdata1.mat", "fixdata2.mat", "fixdata3.mat", "test.mat"]
    splits = {s: read_split(root / f"{s}.json") for s in ("train", "valid", "test")}
    assert splits == {split: [f"{video}/{n:06d}.jpg" for n in range(6, 9)]
                      for split, video in (("train", "01"), ("valid", "02"), ("test", "03"))}
    listed = scipy.io.loadmat(root / "fixdata" / "test.mat")["test"]
    assert [str(row) for row in listed] == splits["test"]
    for video in (1, 2, 3):
        cells = load_fixdata(root / "fixdata" / f"fixdata{video}.mat")
        assert len(cells) == 8
        assert all(cell.size == 0 or (cell.ndim == 2 and cell.shape[1] >= 4) for cell in cells)
    frame = decode_rgb(root / "trafficframe" / "01" / "000001.jpg")
    assert frame.shape == (720, 1280, 3)


def test_bdda_layout(bdda_root):
    root = bdda_root
    videos = sorted(p.name for p in (root / "camera_frames").iterdir())
    assert len(videos) == 3 and all(len(v) == 4 and v.isdigit() for v in videos)
    assert videos == sorted(p.name for p in (root / "gazemap_frames").iterdir())
    splits = {s: read_split(root / f"{s}.json") for s in ("train", "valid", "test")}
    assert splits == {split: [f"{video}/{n:04d}.jpg" for n in range(4, 9)]
                      for split, video in zip(("train", "valid", "test"), videos, strict=True)}
    assert [str(row) for row in scipy.io.loadmat(root / "test.mat")["test"]] == splits["test"]
    name = f"{videos[0]}/0005.jpg"
    assert decode_rgb(root / "camera_frames" / name).shape == (720, 1280, 3)
    gaze = decode_gray(root / "gazemap_frames" / name)
    assert gaze.shape == (576, 1024) and gaze.max() >= 200 and np.median(gaze) < 20


def test_v73_fixdata_is_hdf5_and_reads_the_same(synth_dataset):
    v5, v73 = synth_dataset("trafficgaze"), synth_dataset("trafficgaze", mat_format="v7.3")
    assert h5py.is_hdf5(v73 / "fixdata" / "fixdata1.mat")
    assert not h5py.is_hdf5(v5 / "fixdata" / "fixdata1.mat")
    for split in ("train", "valid", "test"):
        a = list(read_frames("trafficgaze", v5, split))
        b = list(read_frames("trafficgaze", v73, split))
        assert [f.fixations.tolist() for f in a] == [f.fixations.tolist() for f in b]


@pytest.mark.parametrize("dataset", ["trafficgaze", "drfixd-rainy", "bdda"])
def test_readers_read_every_split(synth_dataset, dataset):
    root = synth_dataset(dataset)
    frames = [f for split in ("train", "valid", "test") for f in read_frames(dataset, root, split)]
    assert len(frames) == 3 * (5 if dataset == "bdda" else 3)
    for frame in frames:
        assert frame.image_path.is_file()
        assert frame.fixations.dtype == np.float64 and np.isfinite(frame.fixations).all()
        if dataset != "bdda":       # tracker noise goes at most 8 pixels past an edge
            assert ((frame.fixations > -9) & (frame.fixations < (729, 1289))).all()


def test_fixations_look_like_eye_tracking(synth_dataset, caplog):
    """Listed frames with zero and one fixation, clusters, out-of-range points dropped + logged."""
    root = synth_dataset("trafficgaze", videos=3, frames=12)
    with caplog.at_level(logging.INFO, logger="pipeline.datasets.readers"):
        frames = [f for split in ("train", "valid", "test")
                  for f in read_frames("trafficgaze", root, split)]
    counts = [len(f.fixations) for f in frames]
    assert 0 in counts and 1 in counts and max(counts) >= 6
    dropped = [re.search(r"fixdata1\.mat: 12 cells, \d+ fixations, (\d+) outside", r.getMessage())
               for r in caplog.records]
    assert int(next(m for m in dropped if m)[1]) >= 1
    busy = max(frames, key=lambda f: len(f.fixations))
    spread = busy.fixations.std(axis=0)
    assert (spread < (720 / 3, 1280 / 3)).all()  # clustered, not uniform over the frame
    empty = next(f for f in frames if len(f.fixations) == 0)
    assert not fixation_label(loader_points(empty.fixations)).any()
    reference = fixation_label_reference(loader_points(busy.fixations))
    assert np.abs(fixation_label(loader_points(busy.fixations)) - reference).max() < 1e-6


def test_frames_look_like_dashcam_video(synth_dataset):
    root = synth_dataset("trafficgaze")
    paths = [root / "trafficframe" / "01" / f"{n:06d}.jpg" for n in (1, 2)]
    sizes = [os.path.getsize(root / "trafficframe" / v / f"{n:06d}.jpg")
             for v in ("01", "02", "03") for n in range(1, 9)]
    assert 80_000 <= min(sizes) and max(sizes) <= 250_000
    first, second = (decode_rgb(p).astype(np.float32) for p in paths)
    other = decode_rgb(root / "trafficframe" / "03" / "000001.jpg").astype(np.float32)
    assert first[:200, :, 2].mean() > first[-200:, :, 2].mean()  # blue sky above, road below
    assert first.std() > 20  # structure, not a flat image
    assert np.abs(first - second).mean() < 0.5 * np.abs(first - other).mean()  # smooth motion
    rainy = decode_rgb(synth_dataset("drfixd-rainy") / "trafficframe" / "01" / "000001.jpg")
    assert rainy.mean() < first.mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synth_dataset):
    for mat_format in ("v5", "v7.3"):
        again = write_dataset("trafficgaze", tmp_path / f"again-{mat_format}", seed=0,
                              mat_format=mat_format)
        assert _digest(again) == _digest(synth_dataset("trafficgaze", mat_format=mat_format))
    other = write_dataset("bdda", tmp_path / "other", videos=1, frames=4, seed=1)
    first = write_dataset("bdda", tmp_path / "first", videos=1, frames=4, seed=0)
    assert _digest(other) != _digest(first)


def test_refuses_to_overwrite_and_bad_arguments(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not an empty folder"):
        write_dataset("bdda", taken, videos=1, frames=4)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="at least 6"):
        write_dataset("trafficgaze", tmp_path / "short", frames=5)
    with pytest.raises(ValueError, match="videos"):
        write_dataset("trafficgaze", tmp_path / "many", videos=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written


def test_cli_synth(tmp_path, caplog):
    out = tmp_path / "raw"
    with caplog.at_level(logging.WARNING):
        assert main(["synth", "--dataset", "drfixd-rainy", "--out", str(out), "--videos", "1",
                     "--frames", "6", "--mat-format", "v7.3", "--seed", "3"]) == 0
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)
    assert h5py.is_hdf5(out / "fixdata" / "fixdata1.mat")
    assert [f.name for f in read_frames("drfixd-rainy", out, "train")] == ["01/000006.jpg"]
    assert main(["synth", "--dataset", "bdda", "--out", str(out)]) == 2  # exists
    assert main(["synth", "--dataset", "bdda", "--out", str(tmp_path / "b"), "--frames", "3"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--dataset", "nosuch", "--out", "x"])


def test_python_dash_m_pipeline(tmp_path):
    out = tmp_path / "bdda"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "synth", "--dataset", "bdda", "--out", str(out),
         "--videos", "1", "--frames", "4"],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "SYNTHETIC" in result.stderr
    assert len(list(read_frames("bdda", out, "train"))) == 1
