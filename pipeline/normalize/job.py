"""A normalize run: plan → per-frame work on Dask → shards written in order → manifest last."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.commandline import parse_size
from pipeline.core.dask_cluster import dask_client
from pipeline.core.errors import BadInputError, OutputError
from pipeline.core.fsio import Folder
from pipeline.core.progress import progress as progress_bar
from pipeline.datasets import check_layout, split_files
from pipeline.datasets import get as dataset_entry
from pipeline.datasets.spec import SYNTHETIC_MARKER, Frame
from pipeline.datasets.splits import SPLITS
from pipeline.formats.card import CARD, dataset_card
from pipeline.formats.manifest import (
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    MANIFEST,
    RUN,
    SHARD_NAME,
    canonical_json,
    differences,
    read_manifest,
    version_id,
    write_manifest,
)
from pipeline.formats.shard_index import build_index, write_index
from pipeline.formats.shards import DEFAULT_FRAME_CODEC, shard_name, split_shards, write_shard
from pipeline.normalize.frames import (
    Bad,
    Prepared,
    fingerprint,
    fingerprint_chunk,
    fingerprint_files,
    prepare_chunk,
)
from pipeline.normalize.journal import (
    HEADER,
    PROGRESS,
    InputsWriter,
    ShardRecord,
    load_journal,
    record_path,
    records_from_manifest,
)
from pipeline.normalize.plan import SplitPlan, plan_splits
from pipeline.normalize.settings import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_SHARD_SIZE,
    DEFAULT_SIZE,
    Options,
    pipeline_entry,
)

log = logging.getLogger("pipeline.normalize")

CHUNK = 8
"""Frames per Dask task: large enough to amortise scheduling, small enough to balance load."""


@dataclass
class _Job:
    """One shard on its way: its entries, and Dask futures of either full work or fingerprints."""

    split: str
    index: int
    entries: list[tuple[str, Frame | BadInputError]]
    futures: list[Any]
    check: ShardRecord | None  # the journal record being re-checked; None = full work


class _BadFrames:
    """Skip-and-report bookkeeping, with the --max-bad-fraction limit."""

    def __init__(self, root: Path, total: int, skip: bool, max_fraction: float) -> None:
        self.root, self.total, self.skip, self.max_fraction = root, total, skip, max_fraction
        self.count = 0

    def add(self, bad: Bad) -> None:
        if not self.skip:
            raise BadInputError(self.root / bad.file, bad.problem)
        self.count += 1
        log.warning("skipping %s: %s: %s", bad.name, bad.file, bad.problem)
        if self.count > self.max_fraction * self.total:
            raise BadInputError(self.root, f"{self.count} of {self.total} frames are bad, more than"
                                f" --max-bad-fraction {self.max_fraction:g}; latest: {bad.file}:"
                                f" {bad.problem}; no manifest written")


def normalize(
    dataset: str,
    root: str | os.PathLike[str],
    out: str,
    *,
    size: str | tuple[int, int] = DEFAULT_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    decode: str = "faithful",
    frame_codec: str = DEFAULT_FRAME_CODEC,
    ground_truth: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    skip_bad: bool = False,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare every split of a raw dataset as WebDataset shards + ``manifest.json`` in ``out``.

    Args:
        dataset: one of ``DATASETS``; root: the raw dataset root (local folder).
        out: the prepared folder, a local path or any fsspec URL (``memory://``, ``s3://``...).
        size: prepared frame size "WIDTHxHEIGHT" (or a (height, width) tuple).
        shard_size: split entries per shard. decode: "faithful" or "fast"; frame_codec: "png"
            or "jpeg95" (see ``Options``).
        ground_truth: for DR(eye)VE, "saliency_fix" (None: the default) or "saliency".
        workers / dask_address: local cluster size, or an existing Dask scheduler.
        skip_bad: skip-and-report bad frames instead of failing on the first one;
        max_bad_fraction: even so, fail if more than this fraction of entries is bad.
        overwrite: discard whatever prepared output ``out`` holds instead of refusing it.

    Returns:
        {"version_id", "manifest" (its URL), "samples" {split: n}, "shards", "skipped",
         "frames_per_s"}.

    Raises:
        BadInputError: bad raw input (one line naming the file), too many bad frames, or ``out``
            holding output of other options/inputs. No manifest is written then.
    """
    dataset_entry(dataset)                  # ValueError for an unknown one
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    options = Options(parse_size(size), shard_size, decode, frame_codec,
                      resolve_ground_truth(dataset, ground_truth))
    check_options(dataset, options)
    root = Path(root).resolve()
    check_layout(dataset, root)
    folder = Folder(out)
    with folder.lock():
        return _normalize_into(folder, dataset, root, options, workers=workers,
                               dask_address=dask_address, skip_bad=skip_bad,
                               max_bad_fraction=max_bad_fraction, overwrite=overwrite,
                               progress=progress)


def check_options(dataset: str, options: Options) -> None:
    """ValueError when ``options`` do not apply to ``dataset`` (a reduced JPEG decode of frames
    that come out of videos)."""
    entry = dataset_entry(dataset)
    if options.decode != "faithful" and entry.ground_truths:
        raise ValueError(f"--decode {options.decode} is for JPEG frames; {entry.display}'s frames"
                         " are decoded from videos (faithful)")


def resolve_ground_truth(dataset: str, ground_truth: str | None) -> str | None:
    """The ground truth a prepared ``dataset`` is made from: ``ground_truth``, or the dataset's
    default; None for datasets without a choice. ValueError naming the choices otherwise."""
    choices = dataset_entry(dataset).ground_truths
    if not choices:
        if ground_truth is not None:
            raise ValueError(f"--ground-truth is for the video datasets; {dataset} has one"
                             " ground truth")
        return None
    if ground_truth is None:
        return choices[0]
    if ground_truth not in choices:
        raise ValueError(f"--ground-truth must be one of {', '.join(choices)} for {dataset},"
                         f" got {ground_truth!r}")
    return ground_truth


def _normalize_into(folder: Folder, dataset: str, root: Path, options: Options, *,
                    workers: int | None, dask_address: str | None, skip_bad: bool,
                    max_bad_fraction: float, overwrite: bool, progress: bool) -> dict[str, Any]:
    """:func:`normalize` once it holds the output folder's lock."""
    started = time.perf_counter()
    plans, absent = plan_splits(dataset, root, options.ground_truth)
    total = sum(len(plan.names) for plan in plans.values())
    with dask_client(dask_address, workers) as client:
        header = _header(dataset, root, options, plans, client)
        records = _prepare_output(folder, header, overwrite)
        run = _Run(client, folder, root, options, records,
                   _BadFrames(root, total, skip_bad, max_bad_fraction), progress, total)
        try:
            with InputsWriter(folder) as run.inputs:
                splits = {split: run.split(plan) for split, plan in plans.items()}
        except BaseException:
            if not run.manifest_removed:    # nothing was rewritten: the finished output stands
                folder.remove(PROGRESS)
            raise
        finally:
            run.bar.close()
    for split, entry in splits.items():
        entry["index"] = write_index(folder, split, build_index(
            split_shards(folder.root, {"splits": splits}, split)))
    manifest = {**header, "splits": splits, "absent_splits": absent}
    manifest["inputs"] = {**header["inputs"], "files": run.inputs.entry()}
    vid = version_id(manifest)
    elapsed = time.perf_counter() - started
    result = {
        "version_id": vid, "manifest": folder.url(MANIFEST),
        "samples": {s: v["samples"] for s, v in splits.items()},
        "shards": sum(len(v["shards"]) for v in splits.values()),
        "skipped": sum(len(v["skipped"]) for v in splits.values()),
        "frames_per_s": round(run.worked / elapsed, 1) if elapsed > 0 else None,
    }
    folder.write_bytes(RUN, canonical_json({
        **result, "root": str(root), "out": folder.root, "workers": workers,
        "dask_address": dask_address, "skip_bad": skip_bad, "max_bad_fraction": max_bad_fraction,
        "elapsed_s": round(elapsed, 3), "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }) + b"\n")
    folder.write_bytes(CARD, dataset_card(
        dataset_entry(dataset), manifest, vid,
        _command(dataset, options, skip_bad, max_bad_fraction),
        synthetic=bool(manifest.get("synthetic"))).encode())
    try:
        write_manifest(folder, manifest)    # last: its presence means the run finished
    except OutputError:
        with contextlib.suppress(OSError, OutputError):
            folder.remove(MANIFEST)         # renamed in place, but the run did not finish
        raise
    folder.remove(PROGRESS)
    log.info("prepared %s into %s: %s samples in %d shards, %d frames skipped; version %s",
             dataset, folder.root, result["samples"], result["shards"], result["skipped"], vid)
    return result


def _command(dataset: str, options: Options, skip_bad: bool, max_bad_fraction: float
             ) -> list[str]:
    """The command line that makes this version (for the dataset card), with RAW and OUT for
    the folders: the card's bytes, like the shards', do not depend on where they are."""
    height, width = options.size
    command = ["salmm", "normalize", "--dataset", dataset, "--root", "RAW", "--out", "OUT",
               "--size", f"{width}x{height}", "--shard-size",
               str(options.shard_size), "--decode", options.decode, "--frame-codec",
               options.frame_codec]
    if options.ground_truth is not None:
        command += ["--ground-truth", options.ground_truth]
    if skip_bad:
        command += ["--skip-bad", "--max-bad-fraction", str(max_bad_fraction)]
    return command


def _header(dataset: str, root: Path, options: Options, plans: dict[str, SplitPlan],
            client: Any) -> dict[str, Any]:
    """The manifest fields known before any frame is processed (what a resume must match)."""
    sources = {}
    for split in plans:
        for path in split_files(dataset, root, split):
            rel, size, sha = fingerprint(path, root)
            sources[rel] = {"size": size, "sha256": sha}
    fixdata: dict[str, dict[str, Any]] = {}
    if dataset_entry(dataset).has_fixations:
        videos = sorted({int(name.split("/")[0]) for plan in plans.values()
                         for name in plan.names if name.split("/")[0].isdigit()})
        paths = [str(dataset_entry(dataset).fixdata_file(root, video)) for video in videos]
        futures = client.map(fingerprint_files, [[p] for p in paths], root=str(root), pure=False)
        for part in client.gather(futures):
            fixdata.update(part)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pipeline": pipeline_entry(),
        "dataset": dataset,
        "options": options.manifest_entry(),
        "inputs": {"split_files": sources, "fixdata": fixdata},
    }
    if (root / SYNTHETIC_MARKER).exists():
        header["synthetic"] = True      # made from generated data: said on every picture
    return header


def _header_of(manifest: dict[str, Any]) -> dict[str, Any]:
    header = {k: manifest.get(k) for k in
              ("format", "format_version", "pipeline", "dataset", "options")}
    inputs = manifest.get("inputs", {})
    header["inputs"] = {k: inputs.get(k) for k in ("split_files", "fixdata")}
    if manifest.get("synthetic"):
        header["synthetic"] = True
    return header


def _prepare_output(folder: Folder, header: dict[str, Any], overwrite: bool) -> dict[str, ShardRecord]:
    """Check what ``folder`` already holds against this run; the journal records to resume from."""
    if overwrite:
        _clear(folder)
    folder.makedirs()
    folder.remove_unfinished()
    folder.remove_unfinished(PROGRESS)
    if folder.exists(MANIFEST):
        old = read_manifest(folder.root)
        diff = differences(_header_of(old), header)
        if diff:
            raise BadInputError(folder.url(MANIFEST), (
                f"already holds prepared dataset version {version_id(old)} made with other"
                f" options or inputs ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''});"
                " use --overwrite to replace it"))
        records = records_from_manifest(folder, old)
        records.update(load_journal(folder))
    elif folder.exists(HEADER):
        diff = differences(json.loads(folder.read_bytes(HEADER)), header)
        if diff:
            raise BadInputError(folder.url(HEADER), (
                "an unfinished run with other options or inputs left its output here"
                f" ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''});"
                " use --overwrite to discard it"))
        records = load_journal(folder)
        log.info("resuming: %d finished shards recorded in %s", len(records),
                 folder.url(PROGRESS))
    else:
        records = {}
    folder.write_bytes(HEADER, canonical_json(header))
    return records


def _clear(folder: Folder) -> None:
    """Delete the prepared-output files in ``folder`` (and nothing else)."""
    ours = re.compile(rf"{MANIFEST}.*|{INPUTS}.*|{RUN}.*|{CARD}.*|"
                      rf"({'|'.join(SPLITS)})-index\.npy.*")
    for name in folder.listdir():
        if ours.fullmatch(name) or SHARD_NAME.match(name):
            folder.remove(name)
    folder.remove(PROGRESS)


class _Run:
    """Drives the shards of all splits through Dask and writes them in order."""

    AHEAD = 2

    def __init__(self, client: Any, folder: Folder, root: Path, options: Options,
                 records: dict[str, ShardRecord], bad: _BadFrames, progress: bool,
                 total: int) -> None:
        self.client, self.folder, self.root, self.options = client, folder, root, options
        self.records, self.bad = records, bad
        self.inputs: InputsWriter          # opened by the caller around the splits
        self.worked = 0
        self.manifest_removed = False
        workers = max(1, sum(client.nthreads().values()))
        self.chunk = max(1, min(CHUNK, math.ceil(options.shard_size / (2 * workers))))
        self.ahead = max(self.AHEAD, math.ceil(4 * workers * self.chunk / options.shard_size))
        self.bar = progress_bar(total=total, unit="frame", desc="normalize",
                                disable=not progress, smoothing=0.1)

    def split(self, plan: SplitPlan) -> dict[str, Any]:
        """Process one split; its manifest entry."""
        shards: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        queue: deque[_Job] = deque()
        for index, entries in plan.shards(self.options.shard_size):
            queue.append(self._submit(plan.split, index, entries))
            if len(queue) > self.ahead:
                self._finish(queue.popleft(), shards, skipped)
        while queue:
            self._finish(queue.popleft(), shards, skipped)
        return {"entries": len(plan.names), "samples": sum(s["samples"] for s in shards),
                "shards": shards, "skipped": skipped}

    def _submit(self, split: str, index: int, entries: list[tuple[str, Frame | BadInputError]]) -> _Job:
        name = shard_name(split, index)
        frames = [item for _, item in entries if isinstance(item, Frame)]
        record = self.records.get(name)
        reusable = (record is not None and not record.skipped and len(frames) == len(entries)
                    and self._shard_intact(record))
        task, kwargs = (fingerprint_chunk, {}) if reusable else (prepare_chunk, {"options": self.options})
        futures = [self.client.submit(task, frames[i:i + self.chunk], str(self.root), pure=False,
                                      **kwargs)
                   for i in range(0, len(frames), self.chunk)]
        return _Job(split, index, entries, futures, record if reusable else None)

    def _shard_intact(self, record: ShardRecord) -> bool:
        if self.folder.exists(record.name) and self.folder.sha256(record.name) == record.sha256:
            return True
        log.warning("%s: missing or not as recorded; rebuilding it", self.folder.url(record.name))
        return False

    def _finish(self, job: _Job, shards: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
        name = shard_name(job.split, job.index)
        results: list[Any] = []
        for future in job.futures:
            part = future.result()
            results.extend(part)
            self.bar.update(len(part))
        self.bar.update(len(job.entries) - len(results))
        job.futures.clear()
        if job.check is not None:
            record = self._recheck(job.check, results)
        else:
            record = self._write(name, job.entries, results)
        shards.append(record.manifest_entry())
        skipped.extend({**bad, "shard": name} for bad in record.skipped)
        for path, size, sha in record.inputs:
            self.inputs.add(path, size, sha, name)

    def _recheck(self, record: ShardRecord, results: list[Any]) -> ShardRecord:
        now = [list(item) for result in results if not isinstance(result, Bad) for item in result]
        for result in results:
            if isinstance(result, Bad):
                raise BadInputError(self.root / result.file, f"{result.problem} (it was intact when"
                                    f" {record.name} was made; use --overwrite to start over)")
        if now != record.inputs:
            changed = next((a[0] for a, b in zip(now, record.inputs) if a != b), record.name)
            raise BadInputError(self.root / changed, (
                f"changed since {self.folder.url(record.name)} was made from it; the output would"
                " mix two versions of the raw data; use --overwrite to start over"))
        return record

    def _write(self, name: str, entries: list[tuple[str, Frame | BadInputError]],
               results: list[Prepared | Bad]) -> ShardRecord:
        if not self.manifest_removed and self.folder.exists(MANIFEST):
            self.folder.remove(MANIFEST)  # the output is about to change: no longer complete
        self.manifest_removed = True
        done = iter(results)
        samples, inputs, skipped = [], [], []
        for entry_name, item in entries:
            result = Bad.from_error(entry_name, item, self.root) if isinstance(item, BadInputError) \
                else next(done)
            if isinstance(result, Bad):
                self.bad.add(result)
                skipped.append({"name": result.name, "file": result.file, "problem": result.problem})
                continue
            samples.append(result.sample)
            inputs.extend([path, size, sha] for path, size, sha in result.inputs)
        self.worked += len(samples)
        shard = write_shard(self.folder, name, samples)
        record = ShardRecord(shard.name, shard.samples, shard.sha256, inputs, skipped)
        self.folder.write_bytes(record_path(name), canonical_json(asdict(record)))
        return record
