"""DR(eye)VE and DADA-2000: their raw layouts as downloaded (synthetic, made by ``pipeline synth``),
read out of the videos, prepared, and refused in one line when a video is missing, short,
out of step with its maps, or damaged.

References are written here, independently of the code under test: the frames are decoded by
the ``ffmpeg`` program (imageio-ffmpeg's binary, reading every frame in order) rather than
OpenCV's seeking reader, the split rules are spelled out from the datasets' own documents, and
the shards are read with ``tarfile`` and Pillow.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.datasets import check_layout, dada, dreyeve, read_frames
from pipeline.datasets.layout import layout_report, report_lines
from pipeline.formats.video import VideoFile, close_videos, video_info
from pipeline.normalize.job import normalize
from pipeline.synth import write_dataset

SIZE = (48, 64)             # (height, width) of the prepared samples here


def _ffmpeg_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video, RGB uint8, decoded in order by the ffmpeg program."""
    frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(frames)
    width, height = meta["size"]
    return [np.frombuffer(data, np.uint8).reshape(height, width, 3).copy() for data in frames]


def _gray(rgb: np.ndarray, weights: tuple[int, int, int]) -> np.ndarray:
    """ITU-R BT.601 luma in OpenCV's 14-bit fixed point, ``weights`` for channels 0, 1, 2."""
    total = sum(w * rgb[..., c].astype(np.int64) for c, w in enumerate(weights))
    return ((total + (1 << 13)) >> 14).astype(np.uint8)


BGR2GRAY_ON_RGB = (4899, 9617, 1868)       # R, G, B of an RGB array
RGB2GRAY_ON_BGR_AS_RGB = (1868, 9617, 4899)  # DADA's script: RGB2GRAY applied to OpenCV's BGR


def _samples(prepared: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a split's shards, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(prepared.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def dreyeve_root(tmp_path_factory) -> Path:
    return write_dataset("dreyeve", tmp_path_factory.mktemp("dreyeve") / "DREYEVE_DATA",
                         videos=3, frames=27)


@pytest.fixture(scope="module")
def dada_root(tmp_path_factory) -> Path:
    return write_dataset("dada", tmp_path_factory.mktemp("dada") / "DADA_dataset", videos=3,
                         frames=5)


def test_dreyeve_layout_and_splits_follow_its_documents(dreyeve_root):
    design = (dreyeve_root / "dr(eye)ve_design.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in design] == ["01", "04", "38"]
    for sequence in ("01", "04", "38"):
        for name in ("video_garmin.avi", "video_saliency_fix.avi", "video_saliency.avi"):
            info = video_info(dreyeve_root / sequence / name)
            assert (info.frames, info.size, info.fps) == (27, (1080, 1920), 25.0)
    # sequences 1-37 train, 38-74 test; 04 is one of the five held out for validation; every
    # fifth frame from 15 while below frames - 1 (the authors' xrange(15, 7500 - 1, 5))
    expected = {"train": ["01/000015", "01/000020", "01/000025"],
                "valid": ["04/000015", "04/000020", "04/000025"],
                "test": ["38/000015", "38/000020", "38/000025"]}
    for split, names in expected.items():
        frames = list(read_frames("dreyeve", dreyeve_root, split))
        assert [f.name for f in frames] == names
        first = frames[0]
        assert (first.video_index, first.frame, first.split) == (15, 15, split)
        assert first.image_path.name == "video_garmin.avi"
        assert first.gaze_map_path.name == "video_saliency_fix.avi"      # the default
        assert first.source_size == (1080, 1920)
    other = next(iter(read_frames("dreyeve", dreyeve_root, "test", ground_truth="saliency")))
    assert other.gaze_map_path.name == "video_saliency.avi"
    with pytest.raises(ValueError, match="ground truth must be one of"):
        read_frames("dreyeve", dreyeve_root, "test", ground_truth="maps")
    with pytest.raises(ValueError, match="one ground truth"):
        read_frames("trafficgaze", dreyeve_root, "test", ground_truth="saliency")


def test_dreyeve_design_file_without_a_split_column_and_bad_ones(dreyeve_root, tmp_path):
    root = Path(shutil.copytree(dreyeve_root, tmp_path / "d"))
    design = root / "dr(eye)ve_design.txt"
    design.write_text("01\tMorning\tSunny\tHighway\tD1\n04 Night Rainy Downtown D2\n"
                      "38\tEvening\tCloudy\tCountryside\tD3\n")
    assert dreyeve.read_design(root) == {1: "train", 4: "train", 38: "test"}
    assert next(f.name for f in read_frames("dreyeve", root, "valid")) == "04/000015"
    design.write_text("01 Morning\n75 Night\n")
    with pytest.raises(BadInputError, match=r"design\.txt: line 2: expected a sequence number"):
        read_frames("dreyeve", root, "train")
    design.write_text("01 Morning\n1 Night\n")
    with pytest.raises(BadInputError, match="line 2: sequence 1 is listed twice"):
        read_frames("dreyeve", root, "train")
    design.unlink()
    with pytest.raises(BadInputError, match="not a DR\\(eye\\)VE root: no dr\\(eye\\)ve_design"):
        check_layout("dreyeve", root)


def test_dada_layout_and_official_split_files(dada_root, tmp_path):
    clips = {split: dada.read_clips(dada_root / name) for split, name in dada.SPLIT_FILES.items()}
    assert sorted(len(c) for c in clips.values()) == [1, 1, 1]
    for split, pairs in clips.items():
        (category, clip), = pairs
        raw = json.loads((dada_root / dada.SPLIT_FILES[split]).read_text())
        assert raw == [[[str(category), f"{clip:03d}"], "001"]]      # the official form
        frames = list(read_frames("dada", dada_root, split))
        assert [f.name for f in frames] == [f"{category}/{clip:03d}/{n:04d}" for n in range(1, 6)]
        assert [f.video_index for f in frames] == [0, 1, 2, 3, 4]
        assert frames[0].video == category * 1000 + clip
        assert frames[0].image_path == dada_root / "videos" / f"images_{category}_{clip:03d}.avi"
        assert frames[0].gaze_map_path == dada_root / "maps" / f"maps_{category}_{clip:03d}.avi"
        assert [f.fixation_path for f in frames] == [
            dada_root / str(category) / f"{clip:03d}" / "fixation" / "maps" / f"{n:04d}.mat"
            for n in range(1, 6)]
        assert video_info(frames[0].image_path).size == (660, 1584)
    root = Path(shutil.copytree(dada_root, tmp_path / "d"))
    test = root / "test_file.json"
    for text, problem in (("[[[1, 2]]]", "entry 1: expected [[category, clip], index]"),
                          ("{", "cannot read it as JSON"),
                          ('[[["1", "022"], "001"], [["1", "22"], "002"]]', "listed twice"),
                          ('[[["0", "022"], "001"]]', "out of range")):
        test.write_text(text)
        with pytest.raises(BadInputError) as info:
            read_frames("dada", root, "test")
        assert str(info.value).startswith(str(test)) and problem in str(info.value)
        assert "\n" not in str(info.value)
    test.unlink()
    with pytest.raises(BadInputError, match="test_file.json: missing split file"):
        dada.read_clips(test)
    assert dada.split_names(root, "test") is None


def test_frames_read_in_any_order_equal_the_ffmpeg_programs_in_order(dreyeve_root):
    path = dreyeve_root / "38" / "video_garmin.avi"
    reference = _ffmpeg_frames(path)
    assert len(reference) == 27
    video = VideoFile(path)
    # forward with skips, backwards across a keyframe (every 12), far ahead, the last one
    for index in (0, 5, 6, 17, 3, 26, 12, 11, 24, 1):
        got = cv2.cvtColor(video.read(index), cv2.COLOR_BGR2RGB)
        assert np.array_equal(got, reference[index]), index
    with pytest.raises(BadInputError, match="has 27 frames; frame 27 \\(0-based\\) is not one"):
        video.read(27)
    video.close()


@pytest.mark.parametrize("dataset", ["dreyeve", "dada"])
def test_prepared_samples_equal_a_reference_decoded_and_resized_here(
        dataset, dreyeve_root, dada_root, tmp_path):
    root = dreyeve_root if dataset == "dreyeve" else dada_root
    out = tmp_path / "prepared"
    result = normalize(dataset, root, str(out), size=(SIZE[0], SIZE[1]), workers=1,
                       progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["ground_truth"] == ("saliency_fix" if dataset == "dreyeve"
                                                   else "maps")
    assert sum(result["samples"].values()) == (9 if dataset == "dreyeve" else 15)
    weights = BGR2GRAY_ON_RGB if dataset == "dreyeve" else RGB2GRAY_ON_BGR_AS_RGB
    decoded: dict[Path, list[np.ndarray]] = {}
    for split in ("train", "valid", "test"):
        samples = _samples(out, split)
        assert samples
        for key, sample in samples.items():
            meta = json.loads(sample["json"])
            camera, maps = root / meta["files"]["image"], root / meta["files"]["gaze_map"]
            index = meta["files"]["index"]
            for path in (camera, maps):
                decoded.setdefault(path, _ffmpeg_frames(path))
            frame = np.asarray(Image.open(io.BytesIO(sample["png"])))
            want = cv2.resize(decoded[camera][index], SIZE[::-1], interpolation=cv2.INTER_CUBIC)
            assert np.array_equal(frame, want), key
            gaze = np.asarray(Image.open(io.BytesIO(sample["gaze.png"])))
            want = cv2.resize(_gray(decoded[maps][index], weights), SIZE[::-1],
                              interpolation=cv2.INTER_CUBIC)
            assert np.array_equal(gaze, want), key
            assert meta["image_size"] == list(video_info(camera).size)
            points = np.load(io.BytesIO(sample["fixations.npy"]))
            if dataset == "dada":       # the fixated pixels of the frame's map, 1-based
                fixated = scipy.io.loadmat(root / meta["files"]["fixations"])["I"]
                assert fixated.shape == (660, 1584) and fixated.any()
                rows, cols = np.nonzero(fixated)
                assert points.tolist() == np.column_stack([rows + 1, cols + 1]).tolist()
            else:
                assert points.shape == (0, 2)
    # a frame's inputs are its decoded pixels ("<video>#<index>", bytes, sha256 of the pixels)
    # and, for DADA-2000, its fixation map file
    inputs = [json.loads(line) for line in (out / "inputs.jsonl").read_text().splitlines()]
    files = 3 if dataset == "dada" else 2
    assert len(inputs) == files * sum(result["samples"].values())
    for entry in inputs:
        if entry["path"].endswith(".mat"):
            data = (root / entry["path"]).read_bytes()
            assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
            continue
        video, index = entry["path"].rsplit("#", 1)
        pixels = decoded[root / video][int(index)]
        if "garmin" not in video and "images_" not in video:
            pixels = _gray(pixels, weights)
        assert entry["size"] == pixels.nbytes
        assert entry["sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()


def test_dreyeve_ground_truth_is_recorded_and_makes_another_version(dreyeve_root, tmp_path):
    fix = normalize("dreyeve", dreyeve_root, str(tmp_path / "fix"), size=SIZE, workers=1,
                    progress=False)
    sal = normalize("dreyeve", dreyeve_root, str(tmp_path / "sal"), size=SIZE, workers=1,
                    ground_truth="saliency", progress=False)
    assert fix["version_id"] != sal["version_id"]
    manifest = json.loads((tmp_path / "sal" / "manifest.json").read_text())
    assert manifest["options"]["ground_truth"] == "saliency"
    assert "--ground-truth saliency" in (tmp_path / "sal" / "README.md").read_text()
    one = _samples(tmp_path / "fix", "test")
    other = _samples(tmp_path / "sal", "test")
    assert one.keys() == other.keys()
    assert all(one[k]["png"] == other[k]["png"] for k in one)             # the same frames
    assert any(one[k]["gaze.png"] != other[k]["gaze.png"] for k in one)   # other maps
    with pytest.raises(ValueError, match="--ground-truth must be one of saliency_fix, saliency"):
        normalize("dreyeve", dreyeve_root, str(tmp_path / "x"), ground_truth="maps")
    with pytest.raises(ValueError, match="one ground truth"):
        normalize("bdda", dreyeve_root, str(tmp_path / "x"), ground_truth="saliency")
    with pytest.raises(ValueError, match="decoded from videos"):
        normalize("dreyeve", dreyeve_root, str(tmp_path / "x"), decode="fast")


def _write_video(path: Path, frames: list[np.ndarray]) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FMP4"), 25,
                             (width, height))
    for frame in frames:
        writer.write(frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()


def _one_line(err: BaseException, *parts: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text


def test_bad_videos_are_refused_in_one_line_each(dreyeve_root, tmp_path, caplog):
    root = Path(shutil.copytree(dreyeve_root, tmp_path / "raw"))
    close_videos()
    # missing camera video: its split cannot be listed
    camera = root / "04" / "video_garmin.avi"
    camera.rename(tmp_path / "garmin.avi")
    with pytest.raises(BadInputError) as info:
        list(read_frames("dreyeve", root, "valid"))
    _one_line(info.value, str(camera), "missing video")
    with pytest.raises(BadInputError) as info:
        normalize("dreyeve", root, str(tmp_path / "p0"), size=SIZE, workers=1, progress=False)
    _one_line(info.value, str(camera), "missing video")
    report = layout_report("dreyeve", root)
    assert not report.complete
    assert any("MISSING (first: 04/video_garmin.avi)" in line for line in report_lines(report))
    (tmp_path / "garmin.avi").rename(camera)

    # a map video with fewer frames than the camera video: every frame of that sequence
    maps = root / "01" / "video_saliency_fix.avi"
    _write_video(maps, _ffmpeg_frames(maps)[:20])
    errors: list[BadInputError] = []
    frames = list(read_frames("dreyeve", root, "train", on_bad=errors.append))
    assert frames == [] and len(errors) == 3
    _one_line(errors[0], str(maps), "20 gaze-map frames but video_garmin.avi has 27 frames")

    # a short video: the header announces 27 frames, the file ends after about half of them
    camera = root / "38" / "video_garmin.avi"
    data = camera.read_bytes()
    camera.write_bytes(data[: len(data) // 2])
    # damaged data in the middle of the valid sequence's camera video
    valid = root / "04" / "video_garmin.avi"
    data = bytearray(valid.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    valid.write_bytes(bytes(data))
    close_videos()
    with caplog.at_level(logging.WARNING, logger="pipeline.normalize"):
        result = normalize("dreyeve", root, str(tmp_path / "p1"), size=SIZE, workers=1,
                           skip_bad=True, max_bad_fraction=1.0, progress=False)
    manifest = json.loads((tmp_path / "p1" / "manifest.json").read_text())
    skipped = {s["name"]: s for split in manifest["splits"].values() for s in split["skipped"]}
    assert {"01/000015", "01/000020", "01/000025"} <= skipped.keys()
    short = [s for name, s in skipped.items() if name.startswith("38/")]
    assert short and all(s["file"] == "38/video_garmin.avi" for s in short)
    assert all("ends early or is damaged" in s["problem"] or "damaged data" in s["problem"]
               for s in short)
    damaged = [s for name, s in skipped.items() if name.startswith("04/")]
    assert damaged and all(s["file"] == "04/video_garmin.avi" for s in damaged)
    assert any("FFmpeg reports" in s["problem"] for s in damaged)
    # what was kept decodes cleanly and equals the reference decoder's frames
    kept = _samples(tmp_path / "p1", "valid")
    assert result["skipped"] == len(skipped)
    good = _ffmpeg_frames(dreyeve_root / "04" / "video_garmin.avi")
    for sample in kept.values():
        meta = json.loads(sample["json"])
        want = cv2.resize(good[meta["files"]["index"]], SIZE[::-1], interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), want)
    assert all("\n" not in r.getMessage() for r in caplog.records)

    # without --skip-bad the first bad frame stops the run in one line, and nothing is published
    close_videos()
    with pytest.raises(BadInputError) as info:
        normalize("dreyeve", root, str(tmp_path / "p2"), size=SIZE, workers=1, progress=False)
    _one_line(info.value, str(root))
    assert not (tmp_path / "p2" / "manifest.json").exists()


def test_synth_refuses_what_cannot_be_listed(tmp_path):
    with pytest.raises(ValueError, match="frames must be at least 17 for dreyeve"):
        write_dataset("dreyeve", tmp_path / "short", frames=16)
    with pytest.raises(ValueError, match="videos must be in 1..20 for dreyeve"):
        write_dataset("dreyeve", tmp_path / "many", videos=21)
    assert not os.path.exists(tmp_path / "short")


def test_ffmpeg_messages_are_caught_per_read_and_everything_else_is_written_back(capfd):
    import threading

    from pipeline.formats import video

    before = os.fstat(2)
    found_by_thread: dict[int, list[str]] = {}

    def work(n: int) -> None:
        with video._ffmpeg_messages() as found:
            os.write(2, f"[mpeg4 @ 0x55d{n}] damaged block {n}\nplain line {n}\n".encode())
        found_by_thread[n] = found

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found_by_thread == {n: [f"damaged block {n}"] for n in range(8)}
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)   # fd 2 restored
    err = capfd.readouterr().err
    assert sorted(line for line in err.splitlines() if line.startswith("plain")) == \
        sorted(f"plain line {n}" for n in range(8))
    assert "damaged block" not in err


def test_what_is_not_a_usable_video_is_refused_in_one_line(dreyeve_root, tmp_path, monkeypatch):
    from pipeline.formats import video

    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 40)
    folder = tmp_path / "folder.avi"
    folder.mkdir()
    for path, problem in ((garbage, "cannot be read as a video"), (folder, "not a file"),
                          (tmp_path / "none.avi", "missing video")):
        with pytest.raises(BadInputError) as info:
            video_info(path)
        _one_line(info.value, str(path), problem)
    monkeypatch.setattr(video, "MAX_FRAMES", 20)        # a header announcing too many frames
    with pytest.raises(BadInputError) as info:
        video_info(dreyeve_root / "38" / "video_garmin.avi")
    _one_line(info.value, "announces 27 frames, more than the 20")


def test_dada_fixation_maps_missing_or_bad_are_refused_and_a_clip_without_them_has_none(
        dada_root, tmp_path):
    root = Path(shutil.copytree(dada_root, tmp_path / "raw"))
    (category, clip), = dada.read_clips(root / "test_file.json")
    folder = dada.fixation_folder(root, category, clip)
    (folder / "0002.mat").unlink()
    (folder / "0003.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    scipy.io.savemat(folder / "0004.mat", {"I": np.ones((10, 10), np.uint8)})
    (train_category, train_clip), = dada.read_clips(root / "train_file.json")
    shutil.rmtree(dada.fixation_folder(root, train_category, train_clip).parent)
    close_videos()
    normalize("dada", root, str(tmp_path / "p"), size=SIZE, workers=1, skip_bad=True,
              max_bad_fraction=1.0, progress=False)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    skipped = {s["name"]: s for split in manifest["splits"].values() for s in split["skipped"]}
    name = f"{category}/{clip:03d}/"
    assert skipped[name + "0002"]["problem"].startswith("missing fixation map of")
    assert skipped[name + "0003"]["problem"].startswith("corrupt or truncated MATLAB v5 file")
    assert skipped[name + "0004"]["problem"] == "'I' is 10x10, not the frame's 1584x660"
    assert all("\n" not in s["problem"] for s in skipped.values())
    assert len(skipped) == 3
    train = _samples(tmp_path / "p", "train")            # its clip has no fixation/maps/
    assert len(train) == 5
    assert all(np.load(io.BytesIO(s["fixations.npy"])).shape == (0, 2) for s in train.values())
