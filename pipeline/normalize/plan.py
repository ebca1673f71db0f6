"""The plan of a normalize run: per split whose split file exists (a listed dataset: that its
listing names), its entries in split-file order, each paired with its :class:`~pipeline.datasets.spec.Frame` or the reader's BadInputError, cut
into shards of ``shard_size`` entries (boundaries depend on the split file only, so a bad frame
shortens one shard instead of shifting all later ones)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.datasets import get as dataset_entry
from pipeline.datasets import read_frames
from pipeline.datasets.spec import Frame
from pipeline.datasets.splits import SPLITS, check_disjoint, split_entries, split_path

log = logging.getLogger("pipeline.normalize")


@dataclass
class SplitPlan:
    """One split: its entries (split-file order) and the frames read lazily, shard by shard."""

    dataset: str
    root: Path
    split: str
    names: list[str]
    ground_truth: str | None = None

    def entries(self) -> Iterator[tuple[str, Frame | BadInputError]]:
        """(split entry, Frame or the reader's error) for every entry, in order."""
        pending: list[BadInputError] = []
        position = 0
        for frame in read_frames(self.dataset, self.root, self.split, on_bad=pending.append,
                                 ground_truth=self.ground_truth):
            for err in pending:
                yield self.names[position], err
                position += 1
            pending.clear()
            if self.names[position] != frame.name:
                raise RuntimeError(f"reader yielded {frame.name!r} where the split file has"
                                   f" {self.names[position]!r}")
            yield frame.name, frame
            position += 1
        for err in pending:
            yield self.names[position], err
            position += 1

    def shards(self, shard_size: int) -> Iterator[tuple[int, list[tuple[str, Frame | BadInputError]]]]:
        """(shard index, its entries) in order."""
        batch: list[tuple[str, Frame | BadInputError]] = []
        index = 0
        for entry in self.entries():
            batch.append(entry)
            if len(batch) == shard_size:
                yield index, batch
                batch, index = [], index + 1
        if batch:
            yield index, batch


def plan_splits(dataset: str, root: Path, ground_truth: str | None = None
                ) -> tuple[dict[str, SplitPlan], list[str]]:
    """Plans of the splits whose split file exists, and the names of the absent ones (logged).
    BadInputError (split file and line) for a repeated entry or a frame in two splits."""
    entries, absent = {}, []
    entry = dataset_entry(dataset)
    for split in SPLITS:
        if entry.listed:
            names = entry.splits(root, split)
            if names is None:
                log.warning("%s: no %s entries in %s; split %s is absent", root, split,
                            ", ".join(p.name for p in entry.split_sources(root, split)), split)
                absent.append(split)
            else:
                entries[split] = list(enumerate(names, start=1))
            continue
        path = split_path(root, split)
        if not path.exists():
            log.warning("%s: no %s split file; split %s is absent", path, split, split)
            absent.append(split)
            continue
        entries[split] = split_entries(path)
    if not entries:
        files = sorted({p.name for split in SPLITS for p in (
            entry.split_sources(root, split) if entry.listed else [split_path(root, split)])})
        raise BadInputError(root, f"no split found ({', '.join(files)})")
    check_disjoint(entries, root)
    plans = {split: SplitPlan(dataset, root, split, [name for _, name in lines], ground_truth)
             for split, lines in entries.items()}
    return plans, absent
