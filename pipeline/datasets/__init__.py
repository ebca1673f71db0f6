"""The dataset registry: one entry per driver-gaze dataset, and the generic frame listing.

Every fact about a dataset lives in its :class:`Dataset` entry of :data:`REGISTRY`: its names,
the folder its release unpacks to, the folders of its download layout, the form of its split
entries, the size of its camera frames, what its ground truth is (fixation points or gaze
maps), and the reader class that turns a split entry into a :class:`~pipeline.datasets.readers.Frame`.
Adding a dataset (DR(eye)VE, DADA-2000, ...) is one entry here plus its reader.

:func:`check_layout` and :func:`read_frames` work for any entry. Layouts (``root`` is the
folder holding the split files):

* **TrafficGaze**, **DrFixD-rainy**: ``trafficframe/VV/FFFFFF.jpg``, ``fixdata/fixdata{V}.mat``,
  split entries ``"VV/FFFFFF.jpg"``;
* **BDDA**: ``camera_frames/VVVV/FFFF.jpg``, ``gazemap_frames/VVVV/FFFF.jpg``, split entries
  ``"VVVV/FFFF.jpg"``.

A root that is not the named dataset, a missing or malformed split file, and split entries
not of the dataset's naming form always raise :class:`~pipeline.core.errors.BadInputError`: they
are not per-frame problems.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.datasets.readers import SOURCE_SIZE, FixdataReader, Frame, GazeMapReader
from pipeline.datasets.splits import SPLITS, read_split, split_path

log = logging.getLogger(__name__)

FRAME_SIZE = (720, 1280)
"""(height, width) of the camera frames of all three datasets."""
SYNTHETIC_MARKER = "SYNTHETIC.txt"
"""A file at the root of every dataset :mod:`pipeline.synth` made (it is not real data)."""


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
    builds its frames (``reader(dataset, root, split)(name, video, frame) -> Frame``).
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

    @property
    def has_fixations(self) -> bool:
        """Whether it records fixation points (the AUC and NSS metrics need them)."""
        return self.ground_truth == "fixations"

    def fixdata_file(self, root: Path, video: int) -> Path:
        """The file holding a video's fixations (fixation datasets)."""
        return root / "fixdata" / f"fixdata{video}.mat"


_TRAFFICGAZE_ENTRY = re.compile(r"(\d{2})/(\d{6})\.jpg")

REGISTRY: dict[str, Dataset] = {
    "trafficgaze": Dataset(
        "trafficgaze", "TrafficGaze", "TrafficGaze", ("trafficframe", "fixdata"), "trafficframe",
        _TRAFFICGAZE_ENTRY, "VV/FFFFFF.jpg", FRAME_SIZE, SOURCE_SIZE, "fixations",
        FixdataReader),
    "drfixd-rainy": Dataset(
        "drfixd-rainy", "DrFixD-rainy", "DrFixD_rainy", ("trafficframe", "fixdata"),
        "trafficframe", _TRAFFICGAZE_ENTRY, "VV/FFFFFF.jpg", FRAME_SIZE, SOURCE_SIZE,
        "fixations", FixdataReader),
    "bdda": Dataset(
        "bdda", "BDDA", "BDDA", ("camera_frames", "gazemap_frames"), "camera_frames",
        re.compile(r"(\d{4})/(\d{4})\.jpg"), "VVVV/FFFF.jpg", FRAME_SIZE, (576, 1024),
        "gaze_maps", GazeMapReader),
}
DATASETS = tuple(REGISTRY)
"""The dataset names, in the order command lines list them."""


def get(name: str) -> Dataset:
    """The entry of ``name``; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return REGISTRY[name]


def check_layout(dataset: str, root: str | os.PathLike[str]) -> None:
    """Check that ``root`` has the folders of ``dataset``'s download layout.

    TrafficGaze and DrFixD-rainy share one layout, so this cannot tell them apart.

    Raises:
        ValueError: ``dataset`` is not in the registry.
        BadInputError: ``root`` is missing, not a folder, or lacks the dataset's folders.
    """
    entry = get(dataset)
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "dataset root does not exist" if not root.exists()
                            else "dataset root is not a folder")
    missing = [name for name in entry.folders if not (root / name).is_dir()]
    if not missing:
        return
    looks_like = [other.display for other in REGISTRY.values()
                  if other.folders != entry.folders
                  and all((root / name).is_dir() for name in other.folders)]
    hint = f" (it looks like a {looks_like[0]} root)" if looks_like else ""
    folders = " and ".join(f"{name}/" for name in missing)
    raise BadInputError(root, f"not a {entry.display} root: no {folders} folder{hint}")


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
        dataset: a name in :data:`REGISTRY`.
        root: the dataset root (holds ``train.json`` etc.).
        split: one of :data:`~pipeline.datasets.splits.SPLITS`.
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
    entry = get(dataset)
    root = Path(root)
    if (root / SYNTHETIC_MARKER).exists():
        log.warning("%s: SYNTHETIC %s dataset (generated, not real recordings; see %s)",
                    root, entry.display, SYNTHETIC_MARKER)
    list_file = split_path(root, split)
    entries = []
    for name in read_split(list_file):
        match = entry.entry_pattern.fullmatch(name)
        if match is None:
            raise BadInputError(list_file, f"entry {name!r} is not of the form"
                                f" {entry.entry_form!r}")
        if int(match[2]) == 0:
            raise BadInputError(list_file, f"entry {name!r}: frames are numbered from 1")
        entries.append((name, int(match[1]), int(match[2])))
    return _frames(entries, entry.reader(entry, root, split), on_bad)


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
