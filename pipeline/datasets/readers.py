"""The per-dataset readers: one split entry of a raw download -> a :class:`Frame`.

A reader is made per split (``Reader(dataset, root, split)``) and called per entry
(``reader(name, video, number) -> Frame``); :func:`pipeline.datasets.read_frames` drives it.
The facts it needs - folders, frame size - come from its :class:`~pipeline.datasets.spec.Dataset`.

* :class:`FixdataReader` - **TrafficGaze**, **DrFixD-rainy**: ``trafficframe/VV/FFFFFF.jpg``
  camera frames, ``fixdata/fixdata{V}.mat`` (``V`` without zero padding) with one cell of
  fixations per frame: frame ``F`` of video ``V`` is cell ``F`` (1-based), each ``fixdata``
  file loaded once per reader.
* :class:`GazeMapReader` - **BDDA**: ``camera_frames/VVVV/FFFF.jpg`` camera frames and
  ``gazemap_frames/VVVV/FFFF.jpg`` greyscale gaze maps of the same name.
* :class:`VideoMapReader` - **DR(eye)VE**, **DADA-2000**: a camera video and a gaze-map video
  per sequence or clip (where they are: the dataset's own subclass, in its module); a frame is
  a video file and a frame index in it.

Fixation points are kept as recorded: ``row = column 4``, ``col = column 3`` as float64,
every one of them (the training label and the evaluation each pick theirs, see
:mod:`pipeline.formats.labels`); points outside the 720x1280 frame are counted in one log line per
``fixdata`` file, not an error. Problems that make a frame unusable raise :class:`~pipeline.core.errors.BadInputError`:

* a camera frame or gaze map listed in the split file is missing;
* the video's ``fixdata`` file is missing, truncated or corrupt, or has fewer cells than
  the frame number needs, or the frame's cell has NaN/inf coordinates or < 4 columns;
* a BDDA video whose ``camera_frames`` and ``gazemap_frames`` folders hold different
  numbers of frames (every frame of that video is reported, with the same error object);
* a DR(eye)VE / DADA-2000 camera or gaze-map video that is missing or cannot be opened, a
  gaze-map video whose header announces another number of frames than the camera video's, or
  a frame index past the camera video's frames (each frame of that video is reported).

Readers check that files exist (and read video headers); they do not decode images or video
frames (see :mod:`pipeline.formats.images`, :mod:`pipeline.formats.video`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.datasets.matfile import load_fixdata
from pipeline.datasets.spec import FRAME_SIZE, Dataset, Frame
from pipeline.formats.video import video_info

log = logging.getLogger(__name__)

_NO_POINTS = np.zeros((0, 2), dtype=np.float64)
_NO_POINTS.flags.writeable = False




def fixation_points(
    cell: np.ndarray, source_size: tuple[int, int] = FRAME_SIZE
) -> tuple[np.ndarray, int]:
    """The fixations of one ``fixdata`` cell, as recorded.

    Args:
        cell: float ``[N, k]`` with ``k >= 4`` (column 3 = x, column 4 = y, as recorded), or
            any empty array.
        source_size: (height, width) of the frame.

    Returns:
        ``(points, outside)``: float64 ``[N, 2]`` (row, col) = (column 4, column 3), every
        point in recorded order, read-only; and how many of them neither the Python loader
        nor the MATLAB loop can mark (outside ``(-1, height + 1) x (-1, width + 1)``).

    Raises:
        ValueError: a non-empty cell with fewer than 4 columns, or NaN/inf coordinates.
    """
    cell = np.asarray(cell)
    if cell.size == 0:
        return _NO_POINTS, 0
    if cell.ndim != 2 or cell.shape[1] < 4:
        raise ValueError(f"shape {cell.shape}: fixations need at least 4 columns "
                         "(column 3 = x, column 4 = y)")
    points = np.ascontiguousarray(cell[:, [3, 2]], dtype=np.float64)
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{int((~finite).sum())} of {len(cell)} fixations have NaN/inf coordinates")
    height, width = source_size
    inside = ((points[:, 0] > -1) & (points[:, 0] < height + 1)      # truncates into the
              & (points[:, 1] > -1) & (points[:, 1] < width + 1))    # frame, 0- or 1-based
    points.flags.writeable = False
    return points, int(len(points) - inside.sum())


class FixdataReader:
    """Builds TrafficGaze / DrFixD-rainy frames, loading each ``fixdata`` file once."""

    def __init__(self, dataset: Dataset, root: Path, split: str) -> None:
        self.dataset, self.root, self.split = dataset.name, root, split
        self.frames, self.source_size = dataset.frame_folder, dataset.source_size
        self.fixdata_file = dataset.fixdata_file
        self._videos: dict[int, _VideoFixations | BadInputError] = {}

    def __call__(self, name: str, video: int, number: int) -> Frame:
        image_path = self.root / self.frames / name
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
                     self.source_size)

    def _video(self, video: int) -> _VideoFixations:
        if video not in self._videos:
            try:
                self._videos[video] = _VideoFixations.load(self.fixdata_file(self.root, video))
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
        total = outside = 0
        for cell in load_fixdata(path):
            try:
                points, n_outside = fixation_points(cell)
            except ValueError as err:
                cells.append(str(err))
                continue
            cells.append(points)
            total += len(points)
            outside += n_outside
        log.info("%s: %d cells, %d fixations, %d outside the %dx%d frame (kept as recorded;"
                 " no label marks them)", path, len(cells), total, outside, *FRAME_SIZE)
        return cls(path, cells)


class GazeMapReader:
    """Builds BDDA frames, checking once per video that frame and gaze-map counts agree."""

    def __init__(self, dataset: Dataset, root: Path, split: str) -> None:
        self.dataset, self.root, self.split = dataset.name, root, split
        self.source_size = dataset.source_size
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
        return Frame(self.dataset, self.split, video, number, name, image_path, _NO_POINTS,
                     gaze_map_path, self.source_size)

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


class VideoMapReader:
    """Builds the frames of a video dataset, reading each video pair's headers once.

    A subclass says where a split entry's videos are: :meth:`locate` ``(name, video, number) ->
    (camera video, gaze-map video, 0-based frame index)``, for the ground truth
    ``self.ground_truth`` (one of the dataset's ``ground_truths``).
    """

    def __init__(self, dataset: Dataset, root: Path, split: str,
                 ground_truth: str | None = None) -> None:
        self.dataset, self.root, self.split = dataset.name, root, split
        self.ground_truth = ground_truth or dataset.ground_truths[0]   # checked by read_frames
        self._pairs: dict[Path, tuple[int, tuple[int, int]] | BadInputError] = {}

    def locate(self, name: str, video: int, number: int) -> tuple[Path, Path, int]:
        raise NotImplementedError

    def __call__(self, name: str, video: int, number: int) -> Frame:
        camera, gaze_map, index = self.locate(name, video, number)
        if camera not in self._pairs:
            self._pairs[camera] = self._check_pair(camera, gaze_map)
        pair = self._pairs[camera]
        if isinstance(pair, BadInputError):
            raise pair
        frames, map_size = pair
        if index >= frames:
            raise BadInputError(camera, f"has {frames} frames; {name} (frame {index}, 0-based)"
                                f" is listed in {self.split}")
        return Frame(self.dataset, self.split, video, number, name, camera, _NO_POINTS,
                     gaze_map, map_size, index)

    @staticmethod
    def _check_pair(camera: Path, gaze_map: Path) -> tuple[int, tuple[int, int]] | BadInputError:
        """(frames, gaze-map size) of a camera / gaze-map video pair, or the error that makes
        every frame of it unusable."""
        try:
            frames = video_info(camera).frames
            maps = video_info(gaze_map)
        except BadInputError as err:
            return err
        if maps.frames != frames:
            return BadInputError(gaze_map, f"{maps.frames} gaze-map frames but {camera.name} has"
                                 f" {frames} frames: the maps would not line up with the frames")
        return frames, maps.size
