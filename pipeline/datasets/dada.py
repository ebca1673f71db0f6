"""**DADA-2000** (Fang et al., T-ITS 2021): 2,000 clips of driving accidents in 54 categories,
1584x660, with the gaze maps of the drivers who watched them. Half of it is released (the
rest is kept for a competition).

Layout as downloaded (``DADA_dataset/``; what the authors' ``python/extract_images.py`` in
``JWFangit/LOTVS-DADA`` reads)::

    videos/images_C_CCC.avi       the clip's frames (C = category 1..54, CCC = clip 001..)
    maps/maps_C_CCC.avi           its gaze maps, frame for frame
    train_file.json               the official split, from that repository (copy the three
    val_file.json                 files to the root): a JSON list of [[category, clip],
    test_file.json                index] - the index only numbers the clip in the split
    C/CCC/fixation/maps/NNNN.mat  the frame's fixation map (``I``: non-zero where a driver
                                  fixated), where the release has it (the authors' loader)

The frames are decoded from the videos as they are read (the authors' script unrolls them into
``C/CCC/images/NNNN.png`` first; no such step here). A gaze-map frame becomes greyscale as
that script makes it: ``cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)`` on OpenCV's BGR frame (the
weights of R and B swapped; the same for grey videos). **Frames**: every frame of a clip.
Split entries are ``"C/CCC/NNNN"``: category, clip and the 1-based frame number of the
unrolled files (frame ``NNNN - 1`` of the videos). **Fixations**: a clip with a
``fixation/maps/`` folder has one ``.mat`` per frame (missing one is a bad frame); its fixated
pixels are the frame's fixation points (1-based (row, col)), which the AUC and NSS metrics use;
the labels stay the gaze maps. A clip without that folder has no points: its AUC and NSS are
undefined (NaN, left out of the defined-frame means).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.datasets.readers import VideoMapReader
from pipeline.datasets.spec import Dataset, Frame
from pipeline.formats.video import video_info

SPLIT_FILES = {"train": "train_file.json", "valid": "val_file.json", "test": "test_file.json"}
FRAME_SIZE = (660, 1584)
CLIP_BASE = 1000
"""A clip's video number: ``category * CLIP_BASE + clip`` (category 1, clip 22 -> 1022)."""


def fixation_folder(root: Path, category: int, clip: int) -> Path:
    return root / str(category) / f"{clip:03d}" / "fixation" / "maps"


def camera_video(root: Path, category: int, clip: int) -> Path:
    return root / "videos" / f"images_{category}_{clip:03d}.avi"


def map_video(root: Path, category: int, clip: int) -> Path:
    return root / "maps" / f"maps_{category}_{clip:03d}.avi"


def read_clips(path: Path) -> list[tuple[int, int]]:
    """(category, clip) of every entry of an official split file, in file order.

    Raises:
        BadInputError: the file is unreadable, not JSON, an entry is not ``[[category, clip],
            index]`` of numbers, or a clip is listed twice.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(path, "missing split file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(path, f"cannot read it as JSON ({err})") from None
    if not isinstance(entries, list):
        raise BadInputError(path, "expected a JSON list of [[category, clip], index]")
    clips: list[tuple[int, int]] = []
    for number, entry in enumerate(entries, start=1):
        try:
            (category, clip), _ = entry
            pair = (int(str(category)), int(str(clip)))
        except (TypeError, ValueError):
            raise BadInputError(path, f"entry {number}: expected [[category, clip], index], got"
                                f" {json.dumps(entry)[:60]}") from None
        if not (1 <= pair[0] < 100 and 1 <= pair[1] < CLIP_BASE):
            raise BadInputError(path, f"entry {number}: category {pair[0]} or clip {pair[1]} out"
                                " of range")
        if pair in clips:
            raise BadInputError(path, f"entry {number}: clip {pair[0]}/{pair[1]:03d} is listed"
                                " twice")
        clips.append(pair)
    return clips


def split_names(root: Path, split: str) -> list[str] | None:
    """Every frame of the split's clips, in split-file then frame order (None without its split
    file); BadInputError for a bad split file or a camera video that cannot be opened."""
    path = root / SPLIT_FILES[split]
    if not path.exists():
        return None
    names = []
    for category, clip in read_clips(path):
        frames = video_info(camera_video(root, category, clip)).frames
        names += [f"{category}/{clip:03d}/{n:04d}" for n in range(1, frames + 1)]
    return names


def split_sources(root: Path, split: str) -> list[Path]:
    """The file that defines ``split``: its official split file."""
    return [root / SPLIT_FILES[split]]


def split_needs(root: Path, split: str) -> list[str] | None:
    """The videos ``split`` needs, relative to the root (None without its split file)."""
    path = root / SPLIT_FILES[split]
    if not path.exists():
        return None
    return [p.relative_to(root).as_posix() for category, clip in read_clips(path)
            for p in (camera_video(root, category, clip), map_video(root, category, clip))]


def _numbers(match: re.Match[str]) -> tuple[int, int]:
    return int(match[1]) * CLIP_BASE + int(match[2]), int(match[3])


class Reader(VideoMapReader):
    """DADA-2000 frames: ``videos/images_C_CCC.avi``, ``maps/maps_C_CCC.avi`` and, where the
    clip has them, ``C/CCC/fixation/maps/NNNN.mat``."""

    def locate(self, name: str, video: int, number: int) -> tuple[Path, Path, int]:
        category, clip = divmod(video, CLIP_BASE)
        return (camera_video(self.root, category, clip), map_video(self.root, category, clip),
                number - 1)

    def __call__(self, name: str, video: int, number: int) -> Frame:
        frame = super().__call__(name, video, number)
        folder = fixation_folder(self.root, *divmod(video, CLIP_BASE))
        if not folder.is_dir():
            return frame
        path = folder / f"{number:04d}.mat"
        if not path.is_file():
            raise BadInputError(path, f"missing fixation map of {name} (its clip has"
                                " fixation/maps/)")
        return replace(frame, fixation_path=path)


DATASET = Dataset(
    "dada", "DADA-2000", "DADA_dataset", ("videos", "maps"), "videos",
    re.compile(r"(\d{1,2})/(\d{3})/(\d{4})"), "C/CCC/NNNN", FRAME_SIZE, FRAME_SIZE, "gaze_maps",
    Reader,
    source="https://github.com/JWFangit/LOTVS-DADA",
    terms="research use only, as stated in https://github.com/JWFangit/LOTVS-DADA",
    citation="Fang et al., DADA: Driver Attention Prediction in Driving Accident Scenarios,"
             " IEEE T-ITS 2021",
    manual="DADA-2000 has no Hugging Face mirror. (1) Download it from the Baidu Pan link in"
           " https://github.com/JWFangit/LOTVS-DADA's README (about 53 GB). (2) Put its videos/"
           " and maps/ folders in one folder, DADA_dataset/, with train_file.json, val_file.json"
           " and test_file.json from that repository. (3) Check it with `salmm check-layout"
           " --dataset dada --root DADA_dataset`. No unrolling into frames is needed.",
    splits=split_names, split_sources=split_sources, split_needs=split_needs,
    ground_truths=("maps",),
    entry_numbers=_numbers, map_conversion="RGB2GRAY", fixation_files=True)
