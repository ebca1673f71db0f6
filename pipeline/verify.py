"""``python -m pipeline verify PREPARED``: re-hash a prepared dataset against its manifest.

Checks, and reports each difference as one line:

* ``manifest.json`` reads, and its content still hashes to the ``version_id`` stored in it
  (an edited manifest is caught even where the edit keeps it self-consistent otherwise);
* ``inputs.jsonl`` has the sha256 the manifest pins;
* every shard listed exists, has the recorded sha256, holds only plain ``<key>.<field>`` members
  and the recorded number of samples (one read per shard, which also gives its index rows),
  and (when it differs) whether it is a readable tar and how many samples it holds, so the
  report says what is wrong;
* each split's index of member offsets (``<split>-index.npy``) has the sha256 the manifest
  pins and equals a fresh scan of the intact shards, so random reads land on the right bytes;
* no shard-like file (``<split>-NNNNNN.tar``) lies there that the manifest does not list, and
  no unfinished temporary file.
"""

from __future__ import annotations

import argparse
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import TMP_MARK, Folder
from pipeline.core.progress import track
from pipeline.formats.manifest import (
    INPUTS,
    SHARD_NAME,
    VERSION_KEY,
    malformed,
    read_manifest,
    version_id,
)
from pipeline.formats.shard_index import INDEX_DTYPE, index_name, read_index, scan_shard
from pipeline.formats.shards import Shard, iter_tar

HASH_THREADS = 4

log = logging.getLogger(__name__)
SUMMARY = "Re-hash a prepared dataset against its manifest; say OK or what differs."
LOGGER = "pipeline"


def verify(prepared: str, *, progress: bool = False) -> list[str]:
    """Problems found in the prepared dataset at ``prepared`` (path or URL); [] means intact."""
    folder = Folder(prepared)
    try:
        manifest = read_manifest(prepared)
    except BadInputError as err:
        return [str(err)]
    problem = malformed(manifest, inputs=True)
    if problem:
        return [f"{folder.url('manifest.json')}: malformed manifest: {problem}"]
    problems = []
    recorded, computed = manifest.get(VERSION_KEY), version_id(manifest)
    if recorded != computed:
        problems.append(f"{folder.url('manifest.json')}: content hashes to version {computed}, but"
                        f" it records {recorded}: the manifest was modified")
    problems.extend(_check_inputs(folder, manifest))
    shards = [(split, position, shard) for split, entry in manifest.get("splits", {}).items()
              for position, shard in enumerate(entry["shards"])]
    scanned: dict[str, list[np.ndarray | None]] = {split: [] for split in manifest["splits"]}
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        checks = pool.map(lambda item: _check_shard(folder, item[2], item[1]), shards)
        for (split, _, _), (found, rows) in track(zip(shards, checks), total=len(shards),
                                                  unit="shard", desc="verify",
                                                  disable=not progress):
            problems.extend(found)
            scanned[split].append(rows)
    if not problems:
        problems.extend(_check_indexes(folder, manifest, scanned))
    listed = {shard["name"] for _, _, shard in shards}
    for name in folder.listdir():
        if SHARD_NAME.fullmatch(name) and name not in listed:
            problems.append(f"{folder.url(name)}: shard not listed in the manifest")
        elif TMP_MARK in name:
            problems.append(f"{folder.url(name)}: unfinished temporary file")
    return problems


def _check_inputs(folder: Folder, manifest: dict[str, Any]) -> list[str]:
    pinned = manifest["inputs"]["files"]
    if not folder.exists(INPUTS):
        return [f"{folder.url(INPUTS)}: missing"]
    sha = folder.sha256(INPUTS)
    if sha != pinned["sha256"]:
        return [(f"{folder.url(INPUTS)}: sha256 {sha[:16]}… differs from the manifest's"
                 f" {pinned['sha256'][:16]}…")]
    return []


def _check_indexes(folder: Folder, manifest: dict[str, Any],
                   scanned: dict[str, list[np.ndarray]]) -> list[str]:
    """Each split's index against the manifest and against the rows the scan of its (intact)
    shards gave."""
    problems = []
    for split in manifest["splits"]:
        try:
            index = read_index(folder.root, manifest, split)
        except BadInputError as err:
            problems.append(str(err))
            continue
        rows = scanned[split]
        fresh = np.concatenate(rows) if rows else np.zeros(0, dtype=INDEX_DTYPE)
        if not np.array_equal(index, fresh):
            row = int(np.flatnonzero(index != fresh)[0])
            problems.append(f"{folder.url(index_name(split))}: row {row} does not match the"
                            " shards (the index was rewritten to fit)")
    return problems


def _check_shard(folder: Folder, shard: dict[str, Any], position: int
                 ) -> tuple[list[str], np.ndarray | None]:
    """(problems, index rows) of one shard, read once (:func:`scan_shard`: its sha256, members
    and sample count); a shard that fails is read again only to say how it differs."""
    name, url = shard["name"], folder.url(shard["name"])
    if not folder.exists(name):
        return [f"{url}: missing"], None
    try:
        return [], scan_shard(Shard(url, shard["samples"], shard["sha256"]), position)
    except BadInputError as err:
        failed = str(err)
    sha = folder.sha256(name)
    if sha == shard["sha256"]:
        return [failed], None                 # bytes as recorded, but not a salmm shard
    detail = f"{url}: sha256 {sha[:16]}… differs from the manifest's {shard['sha256'][:16]}…"
    try:
        with folder.open(name) as f:
            samples = sum(1 for _ in iter_tar(f))
    except (tarfile.TarError, OSError) as err:
        return [f"{detail} (not a readable tar: {err})"], None
    if samples != shard["samples"]:
        return [f"{detail} ({samples} samples, the manifest says {shard['samples']})"], None
    return [f"{detail} (same {samples} samples, content changed)"], None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline verify``."""
    parser.add_argument("prepared", help="prepared folder (local path or fsspec URL)")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline verify``: 0 and "OK" if intact, else each difference logged and 2."""
    problems = verify(args.prepared, progress=True)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        log.error("%s: %d difference(s) from its manifest", args.prepared, len(problems))
        return 2
    manifest = read_manifest(args.prepared)
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    samples = sum(s["samples"] for s in manifest["splits"].values())
    log.info("%s: OK, version %s, %d shards, %d samples", args.prepared, manifest["version_id"],
             shards, samples)
    return 0
