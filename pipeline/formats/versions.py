"""Prepared data versions as a user works with them (``salmm data``): every version under a
root, one version's facts, and what differs between two.

A version is a prepared folder's ``manifest.json`` (its ``version_id`` covers the options, the
software that shaped the bytes, every raw input file by sha256, and every sample written or
skipped: :mod:`pipeline.formats.manifest`). ``run.json`` beside it says when it was made; it is
not part of the version.

* :func:`open_version` - one version's summary (:class:`Version`);
* :func:`find_versions` - every version under a root, and a one-line problem for each manifest
  that does not read;
* :func:`diff_versions` - options, software, raw files added / removed / changed, samples and
  skipped frames of two versions (:class:`VersionDiff`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.manifest import INPUTS, MANIFEST, RUN, VERSION_KEY, read_manifest

__all__ = ["Version", "VersionDiff", "describe_options", "diff_versions", "find_versions",
           "open_version", "raw_files"]


@dataclass(frozen=True)
class Version:
    """One prepared version: where it is, its id and dataset, samples per split, frames
    skipped, options (as the manifest records them), the raw inputs' fingerprint (the sha256
    of ``inputs.jsonl``: every raw frame and gaze-map file, path and content) and when its
    normalize run finished (``run.json``; None when that file is absent)."""

    folder: str
    version_id: str
    dataset: str
    samples: dict[str, int]
    skipped: int
    options: dict[str, Any]
    raw_fingerprint: str
    finished: str | None
    manifest: dict[str, Any] = field(repr=False, compare=False)


def open_version(prepared: str | os.PathLike[str]) -> Version:
    """The version at ``prepared`` (a prepared folder, or its manifest.json); BadInputError
    (one line naming the file) when it is not one."""
    prepared = str(prepared)
    if prepared.endswith(MANIFEST):
        prepared = prepared[: -len(MANIFEST)].rstrip("/") or "."
    manifest = read_manifest(prepared)
    folder = Folder(prepared)
    finished = None
    if folder.exists(RUN):
        try:
            finished = json.loads(folder.read_bytes(RUN)).get("finished")
        except (ValueError, AttributeError):
            finished = None
    splits = manifest["splits"]
    return Version(
        folder=prepared, version_id=str(manifest.get(VERSION_KEY)),
        dataset=str(manifest.get("dataset", "?")),
        samples={split: entry["samples"] for split, entry in splits.items()},
        skipped=sum(len(entry.get("skipped", [])) for entry in splits.values()),
        options=manifest.get("options", {}),
        raw_fingerprint=str(manifest.get("inputs", {}).get("files", {}).get("sha256", "")),
        finished=finished, manifest=manifest)


def find_versions(root: str | os.PathLike[str]) -> tuple[list[Version], list[str]]:
    """Every prepared version in ``root`` or below it (folders whose name starts with "." are
    not searched), sorted by folder; and one line for each manifest.json there that is not a
    readable salmm manifest."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(root, "not a folder")
    versions, problems = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MANIFEST in files:
            try:
                versions.append(open_version(folder))
            except BadInputError as err:
                problems.append(str(err))
    return sorted(versions, key=lambda v: v.folder), problems


def describe_options(options: dict[str, Any]) -> str:
    """A manifest's options in a few words: ``256x256 png, faithful decode, 1000 a shard``."""
    size = options.get("size", {})
    frame = options.get("frame", {}).get("codec", "?")
    return (f"{size.get('width', '?')}x{size.get('height', '?')} {frame},"
            f" {options.get('profile', '?')} decode, {options.get('shard_size', '?')} a shard"
            + (f", {options['ground_truth']} maps" if options.get("ground_truth") else ""))


def raw_files(version: Version) -> dict[str, str]:
    """Every raw input file of ``version`` -> its sha256: the split files, the fixdata files
    and each frame / gaze-map file (``inputs.jsonl``)."""
    inputs = version.manifest.get("inputs", {})
    files = {path: entry["sha256"] for kind in ("split_files", "fixdata")
             for path, entry in (inputs.get(kind) or {}).items()}
    folder = Folder(version.folder)
    if not folder.exists(INPUTS):
        raise BadInputError(folder.url(INPUTS), "missing: the version's raw-file list")
    for number, line in enumerate(folder.read_bytes(INPUTS).decode().splitlines(), 1):
        try:
            entry = json.loads(line)
            files[entry["path"]] = entry["sha256"]
        except (ValueError, KeyError, TypeError):
            raise BadInputError(folder.url(INPUTS), f"line {number} is not a raw-file"
                                " record") from None
    return files


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _changed(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    flat_a, flat_b = _flat(a), _flat(b)
    return [(key, flat_a.get(key), flat_b.get(key)) for key in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(key) != flat_b.get(key)]


def _skipped(version: Version) -> dict[str, str]:
    """Skipped split entry -> the problem recorded for it."""
    return {bad["name"]: bad.get("problem", "") for entry in version.manifest["splits"].values()
            for bad in entry.get("skipped", [])}


@dataclass(frozen=True)
class VersionDiff:
    """What differs between versions a and b. options / software / dataset: (key, a, b) per
    differing value; raw files by path (``changed``: same path, other content); samples:
    split -> (a, b) where the counts differ; skipped entries (name -> problem) only in a or
    only in b."""

    a: Version
    b: Version
    dataset: list[tuple[str, Any, Any]]
    options: list[tuple[str, Any, Any]]
    software: list[tuple[str, Any, Any]]
    added: list[str]
    removed: list[str]
    changed: list[str]
    samples: dict[str, tuple[int | None, int | None]]
    skipped_only_a: dict[str, str]
    skipped_only_b: dict[str, str]

    @property
    def same(self) -> bool:
        return self.a.version_id == self.b.version_id


def diff_versions(a: Version, b: Version) -> VersionDiff:
    """What differs between ``a`` and ``b`` (raw files from each one's inputs.jsonl)."""
    files_a, files_b = raw_files(a), raw_files(b)
    skipped_a, skipped_b = _skipped(a), _skipped(b)
    splits = sorted(set(a.samples) | set(b.samples))
    return VersionDiff(
        a=a, b=b,
        dataset=_changed({"dataset": a.dataset}, {"dataset": b.dataset}),
        options=_changed(a.options, b.options),
        software=_changed(a.manifest.get("pipeline", {}), b.manifest.get("pipeline", {})),
        added=sorted(set(files_b) - set(files_a)),
        removed=sorted(set(files_a) - set(files_b)),
        changed=sorted(p for p in set(files_a) & set(files_b) if files_a[p] != files_b[p]),
        samples={s: (a.samples.get(s), b.samples.get(s)) for s in splits
                 if a.samples.get(s) != b.samples.get(s)},
        skipped_only_a={k: v for k, v in skipped_a.items() if k not in skipped_b},
        skipped_only_b={k: v for k, v in skipped_b.items() if k not in skipped_a})
