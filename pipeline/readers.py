"""Frame records from the raw download layouts of the three driver-gaze datasets.

Layouts (``root`` is the folder holding the split files):

* **TrafficGaze**, **DrFixD-rainy**: ``trafficframe/VV/FFFFFF.jpg`` camera frames,
  ``fixdata/fixdata{V}.mat`` (``V`` without zero padding) with one cell of fixations per
  frame, split entries ``"VV/FFFFFF.jpg"``. Frame ``F`` of video ``V`` is cell ``F``
  (1-based) of ``fixdata{V}.mat``.
* **BDDA**: ``camera_frames/VVVV/FFFF.jpg`` camera frames, ``gazemap_frames/VVVV/FFFF.jpg``
  greyscale gaze maps of the same name, split entries ``"VVVV/FFFF.jpg"``.

:func:`read_frames` yields one :class:`Frame` per split entry, in split-file order. It
checks that the files exist and loads each ``fixdata`` file once (per call); it does not
decode images (see :mod:`pipeline.images`).

Fixation points follow the reference loader exactly: ``row = int(column 4)``,
``col = int(column 3)`` (truncation toward zero, no 1-based shift), and points outside
the 720x1280 frame are dropped — counted in one log line per ``fixdata`` file, not an
error. Problems that make a frame unusable raise :class:`~pipeline.errors.BadInputError`
or, with ``on_bad``, are reported and the frame skipped:

* a camera frame or gaze map listed in the split file is missing;
* the video's ``fixdata`` file is missing, truncated or corrupt, or has fewer cells than
  the frame number needs, or the frame's cell has NaN/inf coordinates or < 4 columns;
* a BDDA video whose ``camera_frames`` and ``gazemap_frames`` folders hold different
  numbers of frames (every frame of that video is reported, with the same error object).

A root that is not the named dataset, a missing or malformed split file, and split
entries not of the dataset's naming form always raise: they are not per-frame problems.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import BadInputError
from pipeline.matfile import load_fixdata
from pipeline.splits import SPLITS, read_split, split_path

log = logging.getLogger(__name__)

DATASETS = ("trafficgaze", "drfixd-rainy", "bdda")
DISPLAY_NAMES = {"trafficgaze": "TrafficGaze", "drfixd-rainy": "DrFixD-rainy", "bdda": "BDDA"}

SOURCE_SIZE = (720, 1280)
"""(height, width) of TrafficGaze / DrFixD-rainy frames, the fixations' coordinate frame."""
FRAME_SIZE = (720, 1280)
"""(height, width) of every camera frame of the three datasets; a frame of another size is bad
input (checked from its header before it is decoded). BDDA gaze maps may be smaller (576x1024),
never larger."""
BDDA_GAZE_SIZE = (576, 1024)
"""(height, width) of BDD-A gaze maps. Nominal: labels use the decoded map's real size."""
SYNTHETIC_MARKER = "SYNTHETIC.txt"

_LAYOUT = {
    "trafficgaze": ("trafficframe", "fixdata"),
    "drfixd-rainy": ("trafficframe", "fixdata"),
    "bdda": ("camera_frames", "gazemap_frames"),
}
_NAME_FORM = {
    "trafficgaze": (re.compile(r"(\d{2})/(\d{6})\.jpg"), "VV/FFFFFF.jpg"),
    "drfixd-rainy": (re.compile(r"(\d{2})/(\d{6})\.jpg"), "VV/FFFFFF.jpg"),
    "bdda": (re.compile(r"(\d{4})/(\d{4})\.jpg"), "VVVV/FFFF.jpg"),
}
_NO_POINTS = np.zeros((0, 2), dtype=np.int32)
_NO_POINTS.flags.writeable = False


@dataclass(frozen=True)
class Frame:
    """One frame of a split and its gaze ground truth.

    Attributes:
        dataset: one of :data:`DATASETS`.
        split: one of :data:`SPLITS`.
        video: video number from the split entry (``"01/000006.jpg"`` -> 1).
        frame: frame number from the split entry (-> 6); for TrafficGaze / DrFixD-rainy
            also the 1-based cell index in ``fixdata{video}.mat``.
        name: the split entry itself, e.g. ``"01/000006.jpg"`` or ``"0006/0004.jpg"``.
        image_path: the camera frame (``trafficframe/...`` or ``camera_frames/...``).
        fixations: int32 ``[N, 2]`` (row, col) pixel coordinates in ``source_size``, all
            in range, in the recorded order (duplicates kept); read-only; ``[0, 2]`` for BDDA.
        gaze_map_path: BDDA ``gazemap_frames/...`` file; ``None`` for the other datasets.
        source_size: (height, width) the ground truth refers to: (720, 1280) for
            TrafficGaze / DrFixD-rainy, the nominal gaze-map size (576, 1024) for BDDA.
    """

    dataset: str
    split: str
    video: int
    frame: int
    name: str
    image_path: Path
    fixations: np.ndarray
    gaze_map_path: Path | None
    source_size: tuple[int, int]


def check_layout(dataset: str, root: str | os.PathLike[str]) -> None:
    """Check that ``root`` has the folders of ``dataset``'s download layout.

    TrafficGaze and DrFixD-rainy share one layout, so this cannot tell them apart.

    Raises:
        ValueError: ``dataset`` is not one of :data:`DATASETS`.
        BadInputError: ``root`` is missing, not a folder, or lacks the dataset's folders.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "dataset root does not exist" if not root.exists()
                            else "dataset root is not a folder")
    missing = [name for name in _LAYOUT[dataset] if not (root / name).is_dir()]
    if not missing:
        return
    looks_like = [DISPLAY_NAMES[other] for other in ("trafficgaze", "bdda")
                  if _LAYOUT[other] != _LAYOUT[dataset]
                  and all((root / name).is_dir() for name in _LAYOUT[other])]
    hint = f" (it looks like a {looks_like[0]} root)" if looks_like else ""
    folders = " and ".join(f"{name}/" for name in missing)
    raise BadInputError(root, f"not a {DISPLAY_NAMES[dataset]} root: no {folders} folder{hint}")


def read_frames(
    dataset: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    on_bad: Callable[[BadInputError], None] | None = None,
) -> Iterator[Frame]:
    """Frames of one split, in split-file order.

    The layout, the split file and its entries are checked when this is called; each frame's
    files are checked as it is yielded.

    Args:
        dataset: one of :data:`DATASETS`.
        root: the dataset root (holds ``train.json`` etc.).
        split: one of :data:`SPLITS`.
        on_bad: called with the error of each bad frame, which is then skipped; without
            it the first bad frame raises.

    Raises:
        ValueError: unknown ``dataset`` or ``split``.
        BadInputError: not a root of ``dataset``; missing or malformed split file; an entry
            not of the dataset's naming form; a bad frame when ``on_bad`` is None.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_layout(dataset, root)
    root = Path(root)
    if (root / SYNTHETIC_MARKER).exists():
        log.warning("%s: SYNTHETIC %s dataset (generated, not real recordings; see %s)",
                    root, DISPLAY_NAMES[dataset], SYNTHETIC_MARKER)
    list_file = split_path(root, split)
    pattern, form = _NAME_FORM[dataset]
    entries = []
    for name in read_split(list_file):
        match = pattern.fullmatch(name)
        if match is None:
            raise BadInputError(list_file, f"entry {name!r} is not of the form {form!r}")
        if int(match[2]) == 0:
            raise BadInputError(list_file, f"entry {name!r}: frames are numbered from 1")
        entries.append((name, int(match[1]), int(match[2])))
    make = _BddaFrames(root, split) if dataset == "bdda" else _FixdataFrames(dataset, root, split)
    return _frames(entries, make, on_bad)


def _frames(
    entries: list[tuple[str, int, int]],
    make: Callable[[str, int, int], Frame],
    on_bad: Callable[[BadInputError], None] | None,
) -> Iterator[Frame]:
    for name, video, number in entries:
        try:
            frame = make(name, video, number)
        except BadInputError as err:
            if on_bad is None:
                raise
            on_bad(err)
            continue
        yield frame


def fixation_points(
    cell: np.ndarray, source_size: tuple[int, int] = SOURCE_SIZE
) -> tuple[np.ndarray, int]:
    """In-range pixel coordinates of one ``fixdata`` cell, as the reference loader takes them.

    Args:
        cell: float ``[N, k]`` with ``k >= 4`` (column 3 = x, column 4 = y, 1-based as
            recorded), or any empty array.
        source_size: (height, width) of the frame.

    Returns:
        ``(points, dropped)``: int32 ``[M, 2]`` (row, col) with ``row = int(y)``,
        ``col = int(x)`` (truncated toward zero) kept where ``0 <= row < height`` and
        ``0 <= col < width``, in the recorded order; and ``dropped = N - M``.

    Raises:
        ValueError: a non-empty cell with fewer than 4 columns, or NaN/inf coordinates.
    """
    cell = np.asarray(cell)
    if cell.size == 0:
        return _NO_POINTS, 0
    if cell.ndim != 2 or cell.shape[1] < 4:
        raise ValueError(f"shape {cell.shape}: fixations need at least 4 columns "
                         "(column 3 = x, column 4 = y)")
    row_col = cell[:, [3, 2]].astype(np.float64)
    finite = np.isfinite(row_col).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{int((~finite).sum())} of {len(cell)} fixations have NaN/inf coordinates")
    row_col = np.trunc(row_col)
    height, width = source_size
    keep = ((row_col[:, 0] >= 0) & (row_col[:, 0] < height)
            & (row_col[:, 1] >= 0) & (row_col[:, 1] < width))
    points = row_col[keep].astype(np.int32)
    points.flags.writeable = False
    return points, int(len(cell) - keep.sum())


class _FixdataFrames:
    """Builds TrafficGaze / DrFixD-rainy frames, loading each ``fixdata`` file once."""

    def __init__(self, dataset: str, root: Path, split: str) -> None:
        self.dataset, self.root, self.split = dataset, root, split
        self._videos: dict[int, _VideoFixations | BadInputError] = {}

    def __call__(self, name: str, video: int, number: int) -> Frame:
        image_path = self.root / "trafficframe" / name
        if not image_path.is_file():
            raise BadInputError(image_path, f"missing frame listed in {self.split}.json")
        fixdata = self._video(video)
        if number > len(fixdata.cells):
            raise BadInputError(fixdata.path, f"has {len(fixdata.cells)} cells, fewer than the "
                                              f"frames: {name} needs cell {number}")
        points = fixdata.cells[number - 1]
        if isinstance(points, str):
            raise BadInputError(fixdata.path, f"cell {number} ({name}): {points}")
        return Frame(self.dataset, self.split, video, number, name, image_path, points, None,
                     SOURCE_SIZE)

    def _video(self, video: int) -> _VideoFixations:
        if video not in self._videos:
            try:
                path = self.root / "fixdata" / f"fixdata{video}.mat"
                self._videos[video] = _VideoFixations.load(path)
            except BadInputError as err:
                self._videos[video] = err
        found = self._videos[video]
        if isinstance(found, BadInputError):
            raise found
        return found


@dataclass(frozen=True)
class _VideoFixations:
    path: Path
    cells: list[np.ndarray | str]  # per cell: the points, or the problem that makes it unusable

    @classmethod
    def load(cls, path: Path) -> _VideoFixations:
        cells: list[np.ndarray | str] = []
        total = dropped = 0
        for cell in load_fixdata(path):
            try:
                points, n_dropped = fixation_points(cell)
            except ValueError as err:
                cells.append(str(err))
                continue
            cells.append(points)
            total += len(points) + n_dropped
            dropped += n_dropped
        log.info("%s: %d cells, %d fixations, %d outside the %dx%d frame dropped "
                 "(as the reference loader does)", path, len(cells), total, dropped, *SOURCE_SIZE)
        return cls(path, cells)


class _BddaFrames:
    """Builds BDDA frames, checking once per video that frame and gaze-map counts agree."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        self._video_errors: dict[str, BadInputError | None] = {}

    def __call__(self, name: str, video: int, number: int) -> Frame:
        image_path = self.root / "camera_frames" / name
        gaze_map_path = self.root / "gazemap_frames" / name
        for path in (image_path, gaze_map_path):
            if not path.is_file():
                raise BadInputError(path, f"missing frame listed in {self.split}.json")
        folder = name.split("/")[0]
        if folder not in self._video_errors:
            self._video_errors[folder] = self._count_mismatch(folder)
        error = self._video_errors[folder]
        if error is not None:
            raise error
        return Frame("bdda", self.split, video, number, name, image_path, _NO_POINTS,
                     gaze_map_path, BDDA_GAZE_SIZE)

    def _count_mismatch(self, folder: str) -> BadInputError | None:
        cameras = _jpeg_names(self.root / "camera_frames" / folder)
        maps = _jpeg_names(self.root / "gazemap_frames" / folder)
        if len(cameras) == len(maps):
            return None
        unpaired = sorted(cameras ^ maps)
        example = (f"; {unpaired[0]} is only in "
                   f"{'camera_frames' if unpaired[0] in cameras else 'gazemap_frames'}/{folder}"
                   if unpaired else "")
        return BadInputError(self.root / "gazemap_frames" / folder,
                             f"{len(maps)} gaze maps but camera_frames/{folder} has "
                             f"{len(cameras)} frames{example}")


def _jpeg_names(folder: Path) -> set[str]:
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if entry.name.endswith(".jpg")}
