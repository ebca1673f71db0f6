"""What a driver-gaze dataset is: its :class:`Dataset` entry (names, layout, split-entry form,
frame size, ground truth, reader) and the :class:`Frame` a reader yields.

The camera frames of the three datasets of the paper are :data:`FRAME_SIZE`; the fixations of
TrafficGaze and DrFixD-rainy are pixels of that frame. DR(eye)VE (1920x1080) and DADA-2000
(1584x660) ship their frames and gaze maps as videos: their frames name a video file and a
frame index in it. One entry per dataset lives in its own module (:mod:`.trafficgaze`,
:mod:`.drfixd_rainy`, :mod:`.bdda`, :mod:`.dreyeve`, :mod:`.dada`); :mod:`pipeline.datasets`
collects them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_SIZE = (720, 1280)
"""(height, width) of the camera frames of all three datasets, and of the pixel grid their
fixations are recorded in."""
SYNTHETIC_MARKER = "SYNTHETIC.txt"
"""A file at the root of every dataset :mod:`pipeline.datasets.synthetic` made (it is not real data)."""

@dataclass(frozen=True)
class Frame:
    """One frame of a split and its gaze ground truth.

    Attributes:
        dataset: a name in :data:`pipeline.datasets.REGISTRY`.
        split: one of :data:`~pipeline.datasets.splits.SPLITS`.
        video: video number from the split entry (``"01/000006.jpg"`` -> 1).
        frame: frame number from the split entry (-> 6); for TrafficGaze / DrFixD-rainy
            also the 1-based cell index in ``fixdata{video}.mat``.
        name: the split entry itself, e.g. ``"01/000006.jpg"`` or ``"0006/0004.jpg"``.
        image_path: the camera frame (``trafficframe/...`` or ``camera_frames/...``).
        fixations: float64 ``[N, 2]`` (row, col) as recorded (``fixdata`` columns 4 and 3,
            source pixels), every point in recorded order, finite; read-only; ``[0, 2]`` for
            BDDA.
        gaze_map_path: BDDA ``gazemap_frames/...`` file; ``None`` for the other datasets.
        source_size: (height, width) the ground truth refers to: (720, 1280) for
            TrafficGaze / DrFixD-rainy, the nominal gaze-map size (576, 1024) for BDDA, the
            frame size for DR(eye)VE and DADA-2000.
        video_index: for the video datasets (DR(eye)VE, DADA-2000), the 0-based index of the
            frame in ``image_path`` and ``gaze_map_path``, which are then video files; None
            when they are image files.
        fixation_path: DADA-2000's per-frame fixation file (``fixation/maps/NNNN.mat``), read
            when the frame is prepared (its points then replace ``fixations``); None otherwise.
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
    video_index: int | None = None
    fixation_path: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """One dataset's facts.

    name: the id used on command lines and in manifests; display: how papers write it;
    release_dir: the folder its download unpacks to; folders: the layout's folders under the
    root (all must exist); frame_folder: where the camera frames are; entry_pattern /
    entry_form: a split entry's regex (groups: video, frame) and its form for messages;
    frame_size: (height, width) every camera frame has (checked before decoding);
    source_size: (height, width) the ground truth refers to; ground_truth: "fixations"
    (points in ``fixdata`` files) or "gaze_maps" (greyscale images); reader: the class that
    builds its frames (``reader(dataset, root, split)(name, video, frame) -> Frame``);
    source: where the original release is (URL); terms: where its terms of use are stated
    (a pointer, not a licence of ours); citation: the paper to cite for it; mirror: the
    Hugging Face dataset repository ``salmm download`` fetches it from ("" when none);
    manual: how to get it by hand where there is no mirror; files: files the layout has at the
    root (checked with the folders); splits: for datasets without one split file of frame
    names per split, the function listing a split's entries (``splits(root, split) -> names``,
    None for an absent split; BadInputError for a bad root) and the files that define them
    (``split_sources(root, split) -> paths``) and the files its entries need, relative to the
    root, found without opening any (``split_needs(root, split) -> paths``, None for an absent
    split; for ``salmm check-layout``); ground_truths: the ground truths a prepared
    dataset can be made from, the default first (none for image datasets); entry_numbers:
    (video, frame) of a split entry's match of ``entry_pattern`` (default: its groups 1 and 2);
    map_conversion: the OpenCV colour conversion that turns a decoded gaze-map video frame
    (BGR) into the dataset's greyscale map, as its authors' code does; fixation_files: whether
    a gaze-map dataset also has per-frame fixation points for the AUC and NSS metrics
    (DADA-2000's fixation maps).
    """

    name: str
    display: str
    release_dir: str
    folders: tuple[str, ...]
    frame_folder: str
    entry_pattern: re.Pattern[str]
    entry_form: str
    frame_size: tuple[int, int]
    source_size: tuple[int, int]
    ground_truth: str
    reader: Callable[..., Callable[[str, int, int], Frame]]
    source: str = ""
    terms: str = ""
    citation: str = ""
    mirror: str = ""
    manual: str = ""
    files: tuple[str, ...] = ()
    splits: Callable[[Path, str], list[str] | None] | None = None
    split_sources: Callable[[Path, str], list[Path]] | None = None
    split_needs: Callable[[Path, str], list[str] | None] | None = None
    ground_truths: tuple[str, ...] = ()
    entry_numbers: Callable[[re.Match[str]], tuple[int, int]] | None = None
    map_conversion: str = "BGR2GRAY"
    fixation_files: bool = False

    def numbers(self, match: re.Match[str]) -> tuple[int, int]:
        """(video, frame) of a split entry matched by ``entry_pattern``."""
        if self.entry_numbers is not None:
            return self.entry_numbers(match)
        return int(match[1]), int(match[2])

    @property
    def listed(self) -> bool:
        """Whether its splits come from :attr:`splits` rather than ``<split>.json`` files."""
        return self.splits is not None

    @property
    def has_fixations(self) -> bool:
        """Whether its ground truth is fixation points (TrafficGaze, DrFixD-rainy: the labels
        are made from them)."""
        return self.ground_truth == "fixations"

    @property
    def scores_fixations(self) -> bool:
        """Whether its frames carry fixation points for the AUC and NSS metrics (the fixation
        datasets, and DADA-2000's fixation maps beside its gaze maps)."""
        return self.has_fixations or self.fixation_files

    def fixdata_file(self, root: Path, video: int) -> Path:
        """The file holding a video's fixations (fixation datasets)."""
        return root / "fixdata" / f"fixdata{video}.mat"
