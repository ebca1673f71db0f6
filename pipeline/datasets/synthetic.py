"""Synthetic raw datasets in the exact download layouts, for tests, demos and benchmarks.

``write_dataset("trafficgaze", out)`` writes what a TrafficGaze download looks like —
``trafficframe/VV/FFFFFF.jpg``, ``fixdata/fixdata{V}.mat``, ``fixdata/test.mat`` and
``train/valid/test.json`` — and likewise DrFixD-rainy (same layout, rainy look) and
BDDA (``camera_frames/VVVV/FFFF.jpg``, 1024x576 ``gazemap_frames/VVVV/FFFF.jpg``,
``test.mat``, split files). Every dataset root gets a ``SYNTHETIC.txt`` saying so, and
the readers log a warning when they read one.

What is imitated, and how (the scenes, fixations and gaze maps: :mod:`pipeline.datasets.scene`):

* **Frames**: 1280x720 JPEG (quality 90) road scenes rendered with a pinhole camera over
  a flat road: sky gradient with clouds, a skyline band, verges, a three-lane road with
  dashed and solid markings in perspective, vehicles, poles and trees, lens blur and
  sensor noise, so sizes (~100-200 KB) and decode costs are those of dashcam frames.
  The camera drives forward and the road sways, so consecutive frames move smoothly.
  DrFixD-rainy frames are darker, hazier and blurrier, with rain streaks and drops.
* **Fixations** (``fixdata`` cells, ``N x 4``: subject, duration in ms, x, y with x/y
  1-based pixels): clustered around the vanishing point and the visible vehicles, a few
  on roadside objects. Each video has a listed frame with no fixation and one with a
  single fixation; ~2% of points lie slightly outside the frame (as real eye-tracking
  does), and another listed frame of video 1 has a point on row 720.4, the 1-based
  last row, which the reference loader drops.
* **BDDA gaze maps**: greyscale 1024x576 JPEGs of blurred blobs on the same kind of
  targets (camera frames stay 1280x720: the sizes differ as in BDD-A).
* **Splits**: by video, dealt in the real 10:2:4 train:valid:test proportion (the
  cycle train, valid, test, train, train, test, train, train); entries start at frame
  6 (TrafficGaze, DrFixD-rainy) or 4 (BDDA) as in the released lists. TrafficGaze
  videos are 01, 02, ...; BDDA videos are sparse 4-digit numbers.
* **DR(eye)VE** (``dr(eye)ve_design.txt``, ``SS/video_garmin.avi``,
  ``SS/video_saliency_fix.avi``, ``SS/video_saliency.avi``) and **DADA-2000**
  (``videos/images_C_CCC.avi``, ``maps/maps_C_CCC.avi``, ``C/CCC/fixation/maps/NNNN.mat``
  binary fixation maps of simulated fixations, the three official split files):
  the same scenes resized to 1920x1080 / 1584x660, MPEG-4 Part 2 AVI at 25 fps (keyframe every
  12 frames, so reading a frame exercises seeking); ``saliency_fix`` maps are blurred
  simulated fixations, ``saliency`` and DADA maps blurred blobs, as grey frames. Sequences
  are real DR(eye)VE numbers dealt in the same cycle (train from 01, valid from the held-out
  04, 12, ..., test from 38), DADA clips real-looking category/clip pairs. A sequence needs
  17 frames for one listed frame (frames 15, 20, ... are listed).

The output depends only on the arguments: the same seed gives the same bytes (given the
same NumPy, OpenCV, Pillow, SciPy and h5py versions). The root is built under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.core.errors import BadInputError, OutputError
from pipeline.core.fsio import fsync_dir
from pipeline.core.progress import progress
from pipeline.datasets import DATASETS, FRAME_SIZE, REGISTRY, SYNTHETIC_MARKER, dada, dreyeve, scene
from pipeline.datasets.matfile import (
    MAT_FORMATS,
    MatFormat,
    write_char_rows,
    write_fixation_map,
    write_fixdata,
)
from pipeline.datasets.splits import SPLITS, write_split

log = logging.getLogger("pipeline.synth")

JPEG_QUALITY = 90
FIRST_LISTED = {"trafficgaze": 6, "drfixd-rainy": 6, "bdda": 4, "dreyeve": 17, "dada": 1}
"""The fewest frames a video may have: the first frame number in the split files (earlier
frames only serve as temporal context); for DR(eye)VE, what its first listed frame needs."""
DEFAULT_FRAMES = {"dreyeve": 22}
"""Frames per video when not given, where 8 would list too few."""
VIDEO_FPS = 25
VIDEO_CODEC = "FMP4"
"""MPEG-4 Part 2 (FFmpeg's ``mpeg4``), which OpenCV's bundled FFmpeg encodes everywhere."""
SPLIT_CYCLE = ("train", "valid", "test", "train", "train", "test", "train", "train")
GENERATOR_VERSION = 1


def write_dataset(
    dataset: str,
    out: str | os.PathLike[str],
    *,
    videos: int = 3,
    frames: int | None = None,
    seed: int = 0,
    mat_format: MatFormat = "v5",
) -> Path:
    """Write a synthetic raw dataset in ``dataset``'s download layout.

    Args:
        dataset: one of :data:`~pipeline.datasets.DATASETS`.
        out: the dataset root to create; must not exist or be an empty folder.
        videos: number of videos (1..99 for TrafficGaze / DrFixD-rainy, 1..2000 for BDDA).
        frames: frames per video (None: 8, or 22 for DR(eye)VE); at least
            :data:`FIRST_LISTED`.
        seed: generator seed; the output bytes depend only on the arguments.
        mat_format: ``"v5"`` or ``"v7.3"`` for the ``fixdata`` files (ignored for BDDA).

    Returns:
        The dataset root.

    Raises:
        ValueError: bad arguments.
        BadInputError: ``out`` exists and is not an empty folder.
    """
    frames = DEFAULT_FRAMES.get(dataset, 8) if frames is None else frames
    check_arguments(dataset, videos, frames, mat_format)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(out, "output already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_all(dataset, staging, videos, frames, seed, mat_format)
        if out.exists():
            out.rmdir()
        staging.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.warning("%s: wrote a SYNTHETIC %s dataset (%d videos x %d frames, seed %d): generated "
                "images and gaze, not real recordings; see %s", out, REGISTRY[dataset].display,
                videos, frames, seed, SYNTHETIC_MARKER)
    return out


def check_arguments(dataset: str, videos: int, frames: int, mat_format: str) -> None:
    """Raise ValueError naming the problem if :func:`write_dataset` cannot take these arguments."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if mat_format not in MAT_FORMATS:
        raise ValueError(f"mat_format must be one of {MAT_FORMATS}, got {mat_format!r}")
    max_videos = {"dreyeve": 20, "dada": 200}.get(    # DR(eye)VE: the valid sequences last
        dataset, 99 if REGISTRY[dataset].has_fixations else 2000)   # BDD-A ids run to 2017
    if not 1 <= videos <= max_videos:
        raise ValueError(f"videos must be in 1..{max_videos} for {dataset}, got {videos}")
    if frames < FIRST_LISTED[dataset]:
        raise ValueError(f"frames must be at least {FIRST_LISTED[dataset]} for {dataset} "
                         f"(split files list frames from {FIRST_LISTED[dataset]} on), got {frames}")


def _write_all(dataset: str, root: Path, videos: int, frames: int, seed: int,
               mat_format: MatFormat) -> None:
    if REGISTRY[dataset].ground_truths:
        _write_videos(dataset, root, videos, frames, seed)
        _write_file(root / SYNTHETIC_MARKER, _marker_text(dataset, videos, frames, seed,
                                                          mat_format))
        return
    bdda = not REGISTRY[dataset].has_fixations      # the gaze-map layout
    rng = np.random.default_rng([seed, DATASETS.index(dataset)])
    if bdda:
        ids = np.sort(rng.choice(np.arange(1, 2018), size=videos, replace=False)).tolist()
        video_dir, frame_name = "{:04d}", "{:04d}.jpg"
    else:
        ids = list(range(1, videos + 1))
        video_dir, frame_name = "{:02d}", "{:06d}.jpg"
    listed = {split: [] for split in SPLITS}
    if not bdda:
        (root / "fixdata").mkdir()
    bar = progress(total=videos * frames, desc=f"synth {dataset}", unit="frame")
    with bar:
        for index, video in enumerate(ids):
            video_rng = np.random.default_rng([seed, DATASETS.index(dataset), video])
            road = scene.Scene(video_rng, rainy=dataset == "drfixd-rainy", city=bdda)
            first = FIRST_LISTED[dataset]
            # listed frames with zero and with one fixation (the same frame if only one is listed)
            special = video_rng.choice(np.arange(first, frames + 1), size=2,
                                       replace=frames == first)
            # a listed frame of video 1 with a point on row 720.4, which the reference drops
            edge_frame = next((n for n in range(first, frames + 1) if n not in special), None)
            cells = []
            for number in range(1, frames + 1):
                name = f"{video_dir.format(video)}/{frame_name.format(number)}"
                image, targets = road.render(number - 1)
                folder = "camera_frames" if bdda else "trafficframe"
                _write_file(root / folder / name, _encode_jpeg(image))
                if bdda:
                    gaze = scene.gaze_map(video_rng, targets)
                    _write_file(root / "gazemap_frames" / name, _encode_jpeg(gaze))
                else:
                    count = 0 if number == special[0] else 1 if number == special[1] else None
                    cell = scene.fixations(video_rng, targets, count)
                    if index == 0 and number == edge_frame:
                        cell[-1, 3] = FRAME_SIZE[0] + 0.4
                    cells.append(cell)
                bar.update()
            if not bdda:
                write_fixdata(root / "fixdata" / f"fixdata{video}.mat", cells, mat_format)
            split = SPLIT_CYCLE[index % len(SPLIT_CYCLE)]
            listed[split] += [f"{video_dir.format(video)}/{frame_name.format(number)}"
                              for number in range(FIRST_LISTED[dataset], frames + 1)]
    for split in SPLITS:
        write_split(root / f"{split}.json", listed[split])
    write_char_rows(root / ("test.mat" if bdda else "fixdata/test.mat"), "test", listed["test"])
    _write_file(root / SYNTHETIC_MARKER, _marker_text(dataset, videos, frames, seed, mat_format))


def _write_videos(dataset: str, root: Path, videos: int, frames: int, seed: int) -> None:
    """DR(eye)VE's or DADA-2000's layout: a camera video and gaze-map videos per sequence."""
    rng = np.random.default_rng([seed, DATASETS.index(dataset)])
    size = REGISTRY[dataset].frame_size
    if dataset == "dreyeve":
        pools = {"train": iter(s for s in dreyeve.TRAIN_SEQUENCES
                               if s not in dreyeve.VALID_SEQUENCES),
                 "valid": iter(dreyeve.VALID_SEQUENCES), "test": iter(range(38, 75))}
        keys = [(next(pools[SPLIT_CYCLE[i % len(SPLIT_CYCLE)]]),) for i in range(videos)]
    else:
        pairs = sorted({(int(c), int(k)) for c, k in zip(rng.integers(1, 55, 4 * videos),
                                                          rng.integers(1, 120, 4 * videos))})
        keys = [pairs[i] for i in np.sort(rng.choice(len(pairs), videos, replace=False))]
    listed: dict[str, list[tuple[int, ...]]] = {split: [] for split in SPLITS}
    bar = progress(total=videos * frames, desc=f"synth {dataset}", unit="frame")
    with bar:
        for index, key in enumerate(keys):
            video_rng = np.random.default_rng([seed, DATASETS.index(dataset), *key])
            road = scene.Scene(video_rng, rainy=False, city=dataset == "dada")
            if dataset == "dreyeve":
                folder = root / f"{key[0]:02d}"
                paths = [folder / dreyeve.CAMERA, *(folder / name for name in dreyeve.MAPS.values())]
            else:
                paths = [dada.camera_video(root, *key), dada.map_video(root, *key)]
            writers = [_VideoWriter(path, size) for path in paths]
            try:
                for number in range(frames):
                    image, targets = road.render(number)
                    image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
                    writers[0].write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                    maps = [_fixation_map(video_rng, targets, size)] if dataset == "dreyeve" else []
                    maps.append(cv2.resize(scene.gaze_map(video_rng, targets), size[::-1],
                                           interpolation=cv2.INTER_LINEAR))
                    if dataset == "dada":
                        dada.fixation_folder(root, *key).mkdir(parents=True, exist_ok=True)
                        write_fixation_map(dada.fixation_folder(root, *key) / f"{number + 1:04d}.mat",
                                           _fixated(scene.fixations(video_rng, targets, None), size))
                    for writer, gray in zip(writers[1:], maps):
                        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
                    bar.update()
            finally:
                for writer in writers:
                    writer.close()
            listed[SPLIT_CYCLE[index % len(SPLIT_CYCLE)]].append(key)
    if dataset == "dreyeve":
        _write_file(root / dreyeve.DESIGN, _design_text(rng, [key[0] for key in keys]))
        return
    for split, name in dada.SPLIT_FILES.items():
        entries = [[[str(c), f"{k:03d}"], f"{i:03d}"] for i, (c, k) in
                   enumerate(sorted(listed[split]), start=1)]
        _write_file(root / name, json.dumps(entries).encode())


def _design_text(rng: np.random.Generator, sequences: list[int]) -> bytes:
    """DR(eye)VE's design file for ``sequences``: number, time of day, weather, landscape,
    driver, train/test (tab-separated)."""
    lines = []
    for sequence in sorted(sequences):
        fields = [f"{sequence:02d}", str(rng.choice(["Morning", "Evening", "Night"])),
                  str(rng.choice(["Sunny", "Cloudy", "Rainy"])),
                  str(rng.choice(["Countryside", "Highway", "Downtown"])),
                  f"D{int(rng.integers(1, 9))}",
                  "train" if sequence in dreyeve.TRAIN_SEQUENCES else "test"]
        lines.append("\t".join(fields))
    return ("\n".join(lines) + "\n").encode("ascii")


def _fixated(cell: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A binary map of ``size`` marking a ``fixdata``-style cell's points (x, y 1-based on the
    1280x720 frame), scaled to ``size``; points off the frame are left out."""
    fixated = np.zeros(size, dtype=np.uint8)
    rows = ((cell[:, 3] - 1) * size[0] / FRAME_SIZE[0]).astype(int)
    cols = ((cell[:, 2] - 1) * size[1] / FRAME_SIZE[1]).astype(int)
    keep = (rows >= 0) & (rows < size[0]) & (cols >= 0) & (cols < size[1])
    fixated[rows[keep], cols[keep]] = 1
    return fixated


def _fixation_map(rng: np.random.Generator, targets: list[scene.Target],
                  size: tuple[int, int]) -> np.ndarray:
    """A DR(eye)VE-like ``saliency_fix`` frame: simulated fixations (720p pixels, scaled to
    ``size``) blurred with a 2-degree-like Gaussian, uint8 ``[H, W]``, peak 255."""
    cell = scene.fixations(rng, targets, None)
    points = np.zeros((size[0] // 4, size[1] // 4), dtype=np.float32)   # blurred at 1/4 scale
    scale = (points.shape[0] / FRAME_SIZE[0], points.shape[1] / FRAME_SIZE[1])
    for x, y in cell[:, 2:4]:
        row, col = int((y - 1) * scale[0]), int((x - 1) * scale[1])
        if 0 <= row < points.shape[0] and 0 <= col < points.shape[1]:
            points[row, col] += 1
    heat = cv2.GaussianBlur(points, (0, 0), 12)
    heat = cv2.resize(heat, size[::-1], interpolation=cv2.INTER_LINEAR)
    peak = heat.max()
    return np.zeros(size, np.uint8) if peak <= 0 else np.round(heat * (255 / peak)).astype(np.uint8)


class _VideoWriter:
    """An AVI file written frame by frame (:data:`VIDEO_CODEC`, :data:`VIDEO_FPS`)."""

    def __init__(self, path: Path, size: tuple[int, int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.size = path, size
        self.writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*VIDEO_CODEC),
                                      VIDEO_FPS, (size[1], size[0]))
        if not self.writer.isOpened():
            raise OutputError(path, f"OpenCV cannot write {VIDEO_CODEC} video here")

    def write(self, bgr: np.ndarray) -> None:
        if bgr.shape != (*self.size, 3):       # OpenCV would only warn and drop the frame
            raise ValueError(f"{self.path}: frame of shape {bgr.shape}, expected {self.size}")
        self.writer.write(bgr)

    def close(self) -> None:
        self.writer.release()


def _marker_text(dataset: str, videos: int, frames: int, seed: int, mat_format: str) -> bytes:
    lines = [
        f"SYNTHETIC {REGISTRY[dataset].display} dataset - NOT real data.",
        "",
        "Generated by `python -m pipeline synth` (salmm) in the download layout of the real",
        "dataset, for tests, demos and benchmarks. The frames are rendered road scenes and the",
        "gaze is simulated: nothing here was recorded from a driver. Never report results on it",
        "as results on the real dataset.",
        "",
        f"dataset: {dataset}",
        f"videos: {videos}",
        f"frames per video: {frames}",
        f"seed: {seed}",
    ]
    if REGISTRY[dataset].has_fixations:
        lines.append(f"fixdata format: MATLAB {mat_format}")
    if REGISTRY[dataset].ground_truths:
        lines.append(f"video codec: {VIDEO_CODEC} at {VIDEO_FPS} fps")
    lines.append(f"generator version: {GENERATOR_VERSION}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
