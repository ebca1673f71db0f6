"""The dataset registry: one entry per driver-gaze dataset, and the generic frame listing.

Every fact about a dataset lives in its :class:`~pipeline.datasets.spec.Dataset` entry, one
module each (:mod:`.trafficgaze`, :mod:`.drfixd_rainy`, :mod:`.bdda`): its names, the folder its
release unpacks to, the folders of its download layout, the form of its split entries, the size
of its camera frames, what its ground truth is (fixation points or gaze maps), and the reader
class (:mod:`.readers`) that turns a split entry into a :class:`~pipeline.datasets.spec.Frame`.
Adding a dataset is one module with its entry, listed in :data:`REGISTRY`, plus a reader if no
existing one fits: DR(eye)VE and DADA-2000 (:mod:`.dreyeve`, :mod:`.dada`) list their splits
from their own files and read frames out of videos.

:func:`check_layout` and :func:`read_frames` work for any entry. A root that is not the named
dataset, a missing or malformed split file, and split entries not of the dataset's naming form
always raise :class:`~pipeline.core.errors.BadInputError`: they are not per-frame problems.

Imports go one way: spec <- readers <- one module per dataset <- this registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.datasets import bdda, dada, dreyeve, drfixd_rainy, trafficgaze
from pipeline.datasets.spec import FRAME_SIZE, SYNTHETIC_MARKER, Dataset, Frame
from pipeline.datasets.splits import SPLITS, read_split, split_path

__all__ = ["DATASETS", "FRAME_SIZE", "REGISTRY", "SYNTHETIC_MARKER", "Dataset", "Frame",
           "check_layout", "get", "read_frames", "split_files"]

log = logging.getLogger(__name__)


REGISTRY: dict[str, Dataset] = {entry.name: entry for entry in (
    trafficgaze.DATASET, drfixd_rainy.DATASET, bdda.DATASET, dreyeve.DATASET, dada.DATASET)}
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
    missing = [f"{name}/ folder" for name in entry.folders if not (root / name).is_dir()]
    missing += [f"{name} file" for name in entry.files if not (root / name).is_file()]
    if not missing:
        return
    looks_like = [other.display for other in REGISTRY.values()
                  if (other.folders, other.files) != (entry.folders, entry.files)
                  and all((root / name).is_dir() for name in other.folders)
                  and all((root / name).is_file() for name in other.files)]
    hint = f" (it looks like a {looks_like[0]} root)" if looks_like else ""
    raise BadInputError(root, f"not a {entry.display} root: no {' and no '.join(missing)}{hint}")


def read_frames(
    dataset: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    on_bad: Callable[[BadInputError], None] | None = None,
    ground_truth: str | None = None,
) -> Iterator[Frame]:
    """Frames of one split, in split-file order (listed datasets: in their listing's order).

    The layout, the split file and its entries are checked when this is called; each frame's
    files are checked as it is yielded.

    Args:
        dataset: a name in :data:`REGISTRY`.
        root: the dataset root (holds ``train.json`` etc.).
        split: one of :data:`~pipeline.datasets.splits.SPLITS`.
        on_bad: called with the error of each bad frame, which is then skipped; without
            it the first bad frame raises.
        ground_truth: for datasets with several, which (one of the entry's
            ``ground_truths``; None: the default).

    Raises:
        ValueError: unknown ``dataset`` or ``split``.
        BadInputError: not a root of ``dataset``; missing or malformed split file; an entry
            not of the dataset's naming form; a bad frame when ``on_bad`` is None.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = get(dataset)
    if ground_truth is not None and ground_truth not in entry.ground_truths:
        raise ValueError(f"{entry.display} has one ground truth; got ground_truth"
                         f" {ground_truth!r}" if not entry.ground_truths else
                         f"ground truth must be one of {entry.ground_truths} for"
                         f" {entry.display}, got {ground_truth!r}")
    check_layout(dataset, root)
    root = Path(root)
    if (root / SYNTHETIC_MARKER).exists():
        log.warning("%s: SYNTHETIC %s dataset (generated, not real recordings; see %s)",
                    root, entry.display, SYNTHETIC_MARKER)
    if entry.listed:
        names = entry.splits(root, split) or []
        entries = [(name, *entry.numbers(entry.entry_pattern.fullmatch(name))) for name in names]
    else:
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
    reader = (entry.reader(entry, root, split, ground_truth=ground_truth)
              if entry.ground_truths else entry.reader(entry, root, split))
    return _frames(entries, reader, on_bad)


def split_files(dataset: str, root: str | os.PathLike[str], split: str) -> list[Path]:
    """The files that define ``split`` of ``dataset`` under ``root``: its ``<split>.json``, or a
    listed dataset's own files (DR(eye)VE's design file, DADA-2000's official split file)."""
    entry = get(dataset)
    if entry.listed:
        return entry.split_sources(Path(root), split)
    return [split_path(root, split)]


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
