"""normalize: raw dataset → deterministic shards + manifest, on Dask; resume; bad frames."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import imageio
import numpy as np
import pytest
from conftest import _tiny_jpeg, write_tiny_dataset
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.datasets import read_frames
from pipeline.formats.images import decode_gray
from pipeline.formats.labels import fixation_label_reference, gaze_map_label, loader_points
from pipeline.formats.manifest import INPUTS, MANIFEST, RUN, read_manifest, shard_urls, version_id
from pipeline.formats.shards import decode_label, decode_npy, iter_tar
from pipeline.normalize import normalize
from pipeline.verify import verify

REPO = Path(__file__).resolve().parents[1]


def _cells(seed: int, frames: int = 6) -> list[np.ndarray]:
    """fixdata cells: a few fixations per frame (x in column 3, y in column 4), one out of frame."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(frames):
        n = int(rng.integers(1, 6))
        cell = np.zeros((n + 1, 4))
        cell[:n, 2] = rng.uniform(1, 1280, n)
        cell[:n, 3] = rng.uniform(1, 720, n)
        cell[n] = [0, 0, 5000, 5000]
        cells.append(cell)
    return cells


def make_trafficgaze(root: Path, frames: int = 6) -> Path:
    """2 videos x ``frames`` frames: video 1 is train, video 2 valid, test empty."""
    return write_tiny_dataset(root, "trafficgaze", {1: _cells(1, frames), 2: _cells(2, frames)},
                              splits={"train": [1], "valid": [2], "test": []})


def outputs(out: Path) -> dict[str, bytes]:
    """Every versioned file of a prepared folder (run.json is run facts, not versioned)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != RUN}


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The in-process cluster's address."""
    return dask_cluster.scheduler_address


@pytest.fixture(scope="module")
def tg_root(tmp_path_factory) -> Path:
    return make_trafficgaze(tmp_path_factory.mktemp("raw") / "tg")


def run(root, out, address, **kwargs):
    return normalize("trafficgaze", root, str(out), dask_address=address, progress=False,
                     **{"shard_size": 4, **kwargs})


def test_one_and_two_worker_processes_give_identical_bytes(tg_root, tmp_path):
    one = normalize("trafficgaze", tg_root, str(tmp_path / "one"), shard_size=4, workers=1,
                    progress=False)
    two = normalize("trafficgaze", tg_root, str(tmp_path / "two"), shard_size=4, workers=2,
                    progress=False)
    assert one["version_id"] == two["version_id"]
    first, second = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert list(first) == ["README.md", INPUTS, MANIFEST, "test-index.npy", "train-000000.tar",
                           "train-000001.tar", "train-index.npy", "valid-000000.tar",
                           "valid-000001.tar", "valid-index.npy"]  # test split: empty
    assert first == second
    assert not (tmp_path / "one" / ".progress").exists()


def test_samples_hold_the_loaders_exact_frame_the_recorded_fixations_and_its_label(
        tg_root, tmp_path, cluster):
    result = run(tg_root, tmp_path, cluster)
    manifest = read_manifest(str(tmp_path))
    assert result["version_id"] == manifest["version_id"] == version_id(manifest)
    assert result["samples"] == {"train": 6, "valid": 6, "test": 0}
    train = manifest["splits"]["train"]
    assert [s["samples"] for s in train["shards"]] == [4, 2] and train["entries"] == 6
    frames = list(read_frames("trafficgaze", tg_root, "train"))
    samples = []
    for url in shard_urls(str(tmp_path), manifest, "train"):
        with open(url, "rb") as f:
            samples.extend(iter_tar(f))
    assert [s["__key__"] for s in samples] == [f"v0001_f{i:06d}" for i in range(1, 7)]
    cells = _cells(1)
    for frame, sample in zip(frames, samples):
        assert set(sample) == {"__key__", "png", "fixations.npy", "json"}
        with Image.open(io.BytesIO(sample["png"])) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
            stored = np.asarray(im)
        # the authors' loader: cv2.resize(imageio.imread(frame), (256, 256), INTER_CUBIC)
        want = cv2.resize(imageio.v2.imread(frame.image_path), (256, 256),
                          interpolation=cv2.INTER_CUBIC)
        np.testing.assert_array_equal(stored, want)
        points = decode_npy(sample["fixations.npy"])           # every point, as recorded
        cell = cells[frame.frame - 1]
        assert points.dtype == np.float64
        np.testing.assert_array_equal(points, cell[:, [3, 2]])
        reference = fixation_label_reference(loader_points(points))
        assert np.abs(decode_label({**sample, "__url__": "x"}, (256, 256)) - reference).max() \
            < 1e-6
        meta = json.loads(sample["json"])
        assert meta == {"dataset": "trafficgaze", "split": "train", "video": 1,
                        "frame": frame.frame, "name": frame.name, "source_size": [720, 1280],
                        "image_size": [720, 1280],
                        "files": {"image": f"trafficframe/{frame.name}",
                                  "fixdata": "fixdata/fixdata1.mat"}}
    inputs = [json.loads(line) for line in (tmp_path / INPUTS).read_text().splitlines()]
    assert inputs[0]["path"] == "trafficframe/01/000001.jpg"
    assert inputs[0]["size"] == (tg_root / "trafficframe/01/000001.jpg").stat().st_size
    assert set(manifest["inputs"]["fixdata"]) == {"fixdata/fixdata1.mat", "fixdata/fixdata2.mat"}
    text = (tmp_path / MANIFEST).read_text()
    assert str(tg_root) not in text and os.uname().nodename not in text
    assert json.loads((tmp_path / RUN).read_text())["root"] == str(tg_root)


def test_one_changed_frame_or_option_changes_the_version(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    base = run(root, tmp_path / "a", cluster)["version_id"]
    assert run(root, tmp_path / "b", cluster, size="128x128")["version_id"] != base
    assert run(root, tmp_path / "c", cluster, decode="fast")["version_id"] != base
    lossy = run(root, tmp_path / "e", cluster, frame_codec="jpeg95")["version_id"]
    assert lossy != base
    with open(tmp_path / "e" / "valid-000000.tar", "rb") as f:
        assert "jpg" in next(iter_tar(f))
    frame = root / "trafficframe/02/000003.jpg"
    pixels = np.asarray(Image.open(frame)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(frame, quality=90)
    assert run(root, tmp_path / "d", cluster)["version_id"] != base


def test_bdda_samples_use_the_gaze_map(tmp_path, cluster):
    root = write_tiny_dataset(tmp_path / "bdda", "bdda", frames={3: 5, 7: 2},
                              splits={"valid": [3], "test": [7]})
    (root / "train.json").unlink()  # some BDDA copies lack train.json: split absent
    result = normalize("bdda", root, str(tmp_path / "out"), shard_size=4, dask_address=cluster,
                       progress=False)
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["absent_splits"] == ["train"] and set(manifest["splits"]) == {"valid", "test"}
    assert result["samples"] == {"valid": 5, "test": 2}
    with open(tmp_path / "out" / "valid-000001.tar", "rb") as f:
        (sample,) = list(iter_tar(f))
    assert sample["__key__"] == "v0003_f000005"
    gray = decode_gray(root / "gazemap_frames/0003/0005.jpg")
    label = decode_label({**sample, "__url__": "x"}, (256, 256))
    np.testing.assert_array_equal(label, gaze_map_label(gray))            # exactly
    assert decode_npy(sample["fixations.npy"]).shape == (0, 2)
    assert json.loads(sample["json"])["files"]["gaze_map"] == "gazemap_frames/0003/0005.jpg"


def test_bad_frame_fails_with_one_line_and_no_manifest(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    bad = root / "trafficframe/01/000005.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(BadInputError) as info:
        run(root, tmp_path / "out", cluster)
    assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_skip_bad_lists_skipped_frames_and_respects_the_limit(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    corrupt = root / "trafficframe/01/000005.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    (root / "trafficframe/02/000002.jpg").unlink()  # the reader reports this one
    with pytest.raises(BadInputError, match="2 of 12 frames are bad"):
        run(root, tmp_path / "strict", cluster, skip_bad=True, max_bad_fraction=0.1)
    assert not (tmp_path / "strict" / MANIFEST).exists()
    result = run(root, tmp_path / "out", cluster, skip_bad=True, max_bad_fraction=0.2)
    assert result["skipped"] == 2 and result["samples"] == {"train": 5, "valid": 5, "test": 0}
    manifest = read_manifest(str(tmp_path / "out"))
    (train_bad,) = manifest["splits"]["train"]["skipped"]
    assert train_bad["name"] == "01/000005.jpg" and train_bad["shard"] == "train-000001.tar"
    assert train_bad["file"] == "trafficframe/01/000005.jpg" and "truncated" in train_bad["problem"]
    (valid_bad,) = manifest["splits"]["valid"]["skipped"]
    assert valid_bad["name"] == "02/000002.jpg" and "missing" in valid_bad["problem"]
    assert [s["samples"] for s in manifest["splits"]["valid"]["shards"]] == [3, 2]


def test_existing_output_of_other_options_is_refused_unless_overwrite(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    out = tmp_path / "out"
    first = run(root, out, cluster)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(root, out, cluster)  # same inputs and options: nothing to redo
    assert again["version_id"] == first["version_id"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    with pytest.raises(BadInputError, match=r"options\.size\.height: 256 → 128.*--overwrite"):
        run(root, out, cluster, size="128x128")
    assert read_manifest(str(out))["version_id"] == first["version_id"]
    third = run(root, out, cluster, size="128x128", overwrite=True)
    assert third["version_id"] != first["version_id"]
    assert verify(str(out)) == []


def test_rerun_refuses_raw_files_changed_since_a_shard_was_made(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    out = tmp_path / "out"
    first = run(root, out, cluster)
    frame = root / "trafficframe/01/000002.jpg"
    frame.write_bytes(frame.read_bytes() + b"\0")
    with pytest.raises(BadInputError, match="000002.jpg: changed since .*--overwrite"):
        run(root, out, cluster)
    assert read_manifest(str(out))["version_id"] == first["version_id"]
    assert run(root, out, cluster, overwrite=True)["version_id"] != first["version_id"]


def test_output_to_an_fsspec_url(tg_root, tmp_path, cluster):
    local = run(tg_root, tmp_path, cluster)
    url = "memory://normalize-test/prepared"
    remote = run(tg_root, url, cluster)
    assert remote["version_id"] == local["version_id"]
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("train-000001.tar", MANIFEST, INPUTS):
        assert fs.cat_file(f"/normalize-test/prepared/{name}") == (tmp_path / name).read_bytes()
    assert verify(url) == []
    fs.rm("/normalize-test", recursive=True)


def _normalize_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "normalize", "--dataset", "trafficgaze",
            "--root", str(root), "--out", str(out), "--shard-size", "2", "--workers", "1",
            *extra]


KILL_AFTER_SHARDS = """
import os, signal, sys
from pipeline.cli import main
from pipeline.normalize import job
write, left = job._Run._write, int(os.environ["KILL_AFTER_SHARDS"])
def write_then_die(self, *args, **kwargs):
    global left
    record = write(self, *args, **kwargs)        # the shard and its journal record
    left -= 1
    if left == 0:
        os.killpg(os.getpgid(0), signal.SIGKILL) # this run and its Dask worker processes
    return record
job._Run._write = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def killed_after(shards: int, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` (a normalize) killed with SIGKILL right after its ``shards``-th shard."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AFTER_SHARDS": str(shards)}
    return subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, *command[3:]], env=env,
                          start_new_session=True, capture_output=True, text=True, check=False)


def test_killed_run_resumes_to_identical_bytes(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg", frames=16)
    normalize("trafficgaze", root, str(tmp_path / "whole"), shard_size=2, dask_address=cluster,
              progress=False)  # uninterrupted, on another cluster
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "killed"
    killed = killed_after(1, _normalize_cmd(root, out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    resumed = subprocess.run(_normalize_cmd(root, out), env=env, capture_output=True,
                             text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 1 finished shards" in resumed.stderr
    assert outputs(out) == outputs(tmp_path / "whole")
    assert verify(str(out)) == []


CTRL_C_AFTER_FIRST_SHARD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, whatever ran us
from pipeline.cli import main
from pipeline.normalize import job
write = job._Run._write
def write_then_ctrl_c(self, *args, **kwargs):
    record = write(self, *args, **kwargs)
    os.killpg(os.getpgid(0), signal.SIGINT)      # what a terminal's Ctrl-C does: every process
    return record
job._Run._write = write_then_ctrl_c
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_is_one_line_and_exit_130_without_worker_tracebacks(tmp_path):
    root = make_trafficgaze(tmp_path / "tg", frames=16)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AFTER_FIRST_SHARD,
         *_normalize_cmd(root, out, "--workers", "2")[3:]],
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, \
        done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR pipeline: interrupted"]
    assert not (out / MANIFEST).exists()


def test_unfinished_run_is_resumed_only_with_the_same_options(tmp_path, cluster):
    root = make_trafficgaze(tmp_path / "tg")
    frame = root / "trafficframe/02/000005.jpg"
    good = frame.read_bytes()
    frame.write_bytes(good[:100])
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match="000005.jpg"):
        run(root, out, cluster)  # stops at valid-000001.tar; train shards are journaled
    assert (out / ".progress" / "train-000000.tar.json").exists()
    assert not (out / MANIFEST).exists()
    with pytest.raises(BadInputError, match=r"unfinished run .*shard_size: 4 → 3.*--overwrite"):
        run(root, out, cluster, shard_size=3)
    frame.write_bytes(good)
    before = (out / "train-000000.tar").stat().st_mtime_ns
    resumed = run(root, out, cluster)
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # kept, not rebuilt
    fresh = run(root, tmp_path / "fresh", cluster)
    assert resumed["version_id"] == fresh["version_id"]
    assert outputs(out) == outputs(tmp_path / "fresh")


@pytest.mark.slow
def test_a_run_of_ten_thousand_frames_killed_halfway_resumes_to_identical_bytes(tmp_path,
                                                                               cluster):
    """The kill test at a real count: 10,000 frames (25 videos of 400), a few dozen distinct
    1280x720 JPEGs hard-linked as all of them; decoded at reduced scale to a 64x64 size (the
    resume logic, not the decoder, is under test here)."""
    from pipeline.datasets.matfile import write_fixdata
    from pipeline.datasets.splits import write_split

    root = tmp_path / "tg10k"
    pool = [root / "pool" / f"{i}.jpg" for i in range(40)]
    pool[0].parent.mkdir(parents=True)
    for i, path in enumerate(pool):
        path.write_bytes(_tiny_jpeg(i))
    (root / "fixdata").mkdir()
    names = {"train": [], "valid": [], "test": []}
    for video in range(1, 26):
        split = "train" if video <= 17 else "valid" if video <= 21 else "test"
        folder = root / "trafficframe" / f"{video:02d}"
        folder.mkdir(parents=True)
        for number in range(1, 401):
            os.link(pool[(video * 401 + number) % len(pool)], folder / f"{number:06d}.jpg")
            names[split].append(f"{video:02d}/{number:06d}.jpg")
        write_fixdata(root / "fixdata" / f"fixdata{video}.mat", _cells(video, 400))
    for split, entries in names.items():
        write_split(root / f"{split}.json", entries)
    extra = ("--size", "64x64", "--decode", "fast", "--shard-size", "250", "--workers", "2")
    whole = subprocess.run(_normalize_cmd(root, tmp_path / "whole")[:-2] + list(extra),
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, check=False)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    command = _normalize_cmd(root, out)[:-2] + list(extra)
    killed = killed_after(20, command)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(out.glob("*.tar"))) == 20 and not (out / MANIFEST).exists()
    resumed = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 20 finished shards" in resumed.stderr
    assert read_manifest(str(out))["splits"]["train"]["samples"] == 6800
    assert outputs(out) == outputs(tmp_path / "whole")
