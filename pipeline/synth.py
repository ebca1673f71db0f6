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

The output depends only on the arguments: the same seed gives the same bytes (given the
same NumPy, OpenCV, Pillow, SciPy and h5py versions). The root is built under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import fsync_dir
from pipeline.core.progress import progress
from pipeline.datasets import DATASETS, FRAME_SIZE, REGISTRY, SYNTHETIC_MARKER, scene
from pipeline.datasets.matfile import MAT_FORMATS, MatFormat, write_char_rows, write_fixdata
from pipeline.datasets.splits import SPLITS, write_split

log = logging.getLogger(__name__)
SUMMARY = "Write a small SYNTHETIC raw dataset in a real download layout (tests, demos)."
LOGGER = "pipeline"

JPEG_QUALITY = 90
FIRST_LISTED = {"trafficgaze": 6, "drfixd-rainy": 6, "bdda": 4}
"""First frame number in the split files (earlier frames only serve as temporal context)."""
SPLIT_CYCLE = ("train", "valid", "test", "train", "train", "test", "train", "train")
GENERATOR_VERSION = 1


def write_dataset(
    dataset: str,
    out: str | os.PathLike[str],
    *,
    videos: int = 3,
    frames: int = 8,
    seed: int = 0,
    mat_format: MatFormat = "v5",
) -> Path:
    """Write a synthetic raw dataset in ``dataset``'s download layout.

    Args:
        dataset: one of :data:`~pipeline.datasets.DATASETS`.
        out: the dataset root to create; must not exist or be an empty folder.
        videos: number of videos (1..99 for TrafficGaze / DrFixD-rainy, 1..2000 for BDDA).
        frames: frames per video; at least the first listed frame number (6, or 4 for BDDA).
        seed: generator seed; the output bytes depend only on the arguments.
        mat_format: ``"v5"`` or ``"v7.3"`` for the ``fixdata`` files (ignored for BDDA).

    Returns:
        The dataset root.

    Raises:
        ValueError: bad arguments.
        BadInputError: ``out`` exists and is not an empty folder.
    """
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
    max_videos = 99 if REGISTRY[dataset].has_fixations else 2000   # BDD-A ids run to 2017
    if not 1 <= videos <= max_videos:
        raise ValueError(f"videos must be in 1..{max_videos} for {dataset}, got {videos}")
    if frames < FIRST_LISTED[dataset]:
        raise ValueError(f"frames must be at least {FIRST_LISTED[dataset]} for {dataset} "
                         f"(split files list frames from {FIRST_LISTED[dataset]} on), got {frames}")


def _write_all(dataset: str, root: Path, videos: int, frames: int, seed: int,
               mat_format: MatFormat) -> None:
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


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline synth``."""
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="download layout to imitate")
    parser.add_argument("--out", required=True, type=Path,
                        help="dataset root to create (must not exist, or be empty)")
    parser.add_argument("--videos", type=int, default=3,
                        help="number of videos (default 3: one each for train, valid, test)")
    parser.add_argument("--frames", type=int, default=8,
                        help="frames per video (default 8; at least 6, or 4 for bdda)")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed (same seed, same bytes)")
    parser.add_argument("--mat-format", choices=MAT_FORMATS, default="v5",
                        help="MATLAB format of the fixdata files (trafficgaze, drfixd-rainy)")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline synth``: write the dataset; exit code."""
    try:
        check_arguments(args.dataset, args.videos, args.frames, args.mat_format)
    except ValueError as err:
        log.error("synth: %s", err)
        return 2
    write_dataset(args.dataset, args.out, videos=args.videos, frames=args.frames, seed=args.seed,
                  mat_format=args.mat_format)
    return 0
