"""What a raw dataset root holds against what its split lists need, before any normalize:
per folder of the layout, the files the split entries name, how many are there, the first
missing ones, and the files no split lists (``salmm check-layout``). For DR(eye)VE and
DADA-2000 the files are the videos of the splits' sequences or clips, counted per split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.datasets import check_layout, get
from pipeline.datasets.splits import SPLITS, split_entries, split_path

SHOWN = 5  # file names named per kind of problem


@dataclass
class FolderCheck:
    """One folder of the layout: the files the splits need (relative to the folder), which of
    them are missing, and the files there that no split needs."""

    name: str
    needed: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


@dataclass
class LayoutReport:
    """A root's layout against its split lists: entries per split file (None: absent) and one
    :class:`FolderCheck` per folder."""

    dataset: str
    root: Path
    splits: dict[str, int | None]
    folders: list[FolderCheck]
    unit: str = "entries"
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return any(n for n in self.splits.values()) and not any(f.missing for f in self.folders)


def _files(folder: Path) -> set[str]:
    """Every file under ``folder``, relative, with / separators."""
    found = set()
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(here).relative_to(folder)
        found.update((rel / name).as_posix() for name in files if not name.startswith("."))
    return found


def layout_report(dataset: str, root: str | os.PathLike[str]) -> LayoutReport:
    """The report of ``root`` as ``dataset``. BadInputError (one line) when it is not the
    dataset's root at all, or a split file is malformed."""
    entry = get(dataset)
    root = Path(root)
    check_layout(dataset, root)
    if entry.listed:
        return _listed_report(dataset, root)
    splits: dict[str, int | None] = {}
    names: list[str] = []
    for split in SPLITS:
        path = split_path(root, split)
        if not path.exists():
            splits[split] = None
            continue
        listed = [name for _, name in split_entries(path)]
        splits[split] = len(listed)
        names += listed
    needed: dict[str, set[str]] = {folder: set() for folder in entry.folders}
    needed[entry.frame_folder].update(names)
    if entry.has_fixations:
        videos = {int(m.group(1)) for name in names if (m := entry.entry_pattern.fullmatch(name))}
        needed["fixdata"] = {entry.fixdata_file(Path(), video).name for video in videos}
    else:
        for folder in entry.folders:
            if folder != entry.frame_folder:
                needed[folder].update(names)     # gaze maps: the frame's name
    checks = []
    for folder in entry.folders:
        present = _files(root / folder)
        checks.append(FolderCheck(folder, needed[folder], sorted(needed[folder] - present),
                                  sorted(present - needed[folder])))
    return LayoutReport(entry.display, root, splits, checks)


def _listed_report(dataset: str, root: Path) -> LayoutReport:
    """The report of a dataset that lists its splits itself: the videos each split needs."""
    entry = get(dataset)
    splits: dict[str, int | None] = {}
    needed: set[str] = set()
    for split in SPLITS:
        files = entry.split_needs(root, split)
        splits[split] = None if files is None else len(files)
        needed.update(files or ())
    sources = {split: ", ".join(p.name for p in entry.split_sources(root, split))
               for split in SPLITS}
    checks = []
    for folder in entry.folders or ("",):
        prefix = f"{folder}/" if folder else ""
        mine = {name[len(prefix):] for name in needed if name.startswith(prefix)}
        if folder:
            present = _files(root / folder)
        else:       # at the root: the files of the sequence folders the splits name
            tops = sorted({name.split("/")[0] for name in mine})
            present = {f"{top}/{name}" for top in tops if (root / top).is_dir()
                       for name in _files(root / top)}
        checks.append(FolderCheck(folder or ".", mine, sorted(mine - present),
                                  sorted(present - mine)))
    return LayoutReport(entry.display, root, splits, checks, "videos", sources)


def report_lines(report: LayoutReport) -> list[str]:
    """The report in a few lines."""
    if report.sources:
        listed = ", ".join(f"{split} ({report.sources[split]}) {n} {report.unit}"
                           if n is not None else f"no {split}"
                           for split, n in report.splits.items())
    else:
        listed = ", ".join(f"{split}.json {n} entries" if n is not None else f"no {split}.json"
                           for split, n in report.splits.items())
    lines = [f"{report.dataset} at {report.root}: {listed}"]
    for check in report.folders:
        line = (f"{check.name}/: {len(check.needed)} needed, "
                f"{len(check.needed) - len(check.missing)} present")
        if check.missing:
            line += (f", {len(check.missing)} MISSING (first: "
                     f"{', '.join(check.missing[:SHOWN])})")
        if check.extra:
            line += (f"; {len(check.extra)} not in any split (e.g. "
                     f"{', '.join(check.extra[:SHOWN])})")
        lines.append(line)
    lines.append("complete: ready to normalize" if report.complete else
                 "INCOMPLETE: normalize would skip or refuse the missing frames")
    return lines
