"""``python -m pipeline normalize``: a raw dataset → deterministic WebDataset shards + manifest.

The run, top to bottom:

1. **Plan** (client). Per split whose split file exists, the entries in split-file order, each
   paired with its :class:`~pipeline.readers.Frame` or the reader's BadInputError. Shard ``k``
   of a split covers entries ``[k * shard_size, (k + 1) * shard_size)``: boundaries depend on the
   split file only, so a bad frame shortens one shard instead of shifting all later ones.
2. **Per-frame work** (Dask workers, in chunks, at most a few shards ahead of the writer so
   memory stays flat): hash the raw files, decode, resize, make the label, encode the sample.
3. **Write** (client, in shard order): each shard is written as a deterministic tar to a
   temporary name, fsync'ed and renamed; then its journal record (shard sha256, the raw files'
   fingerprints, skipped frames) is written atomically under ``.progress/``.
4. **Manifest** (client, last): ``inputs.jsonl`` then ``manifest.json`` (its presence means
   "complete"), ``run.json`` (run facts, not versioned); ``.progress/`` is removed.

Re-running resumes: a shard is kept only if its journal record's sha256 matches the file and
its frames' raw files still hash the same (that re-hash is cheap Dask work); shards with
skipped frames are always redone. Output made with other options or inputs is refused (one
error naming what differs) unless ``overwrite=True``. The result is byte-identical to an
uninterrupted run whatever the number of workers, because every byte is a pure function of the
raw inputs and the options, and the client writes in a fixed order.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL
from PIL import features

from pipeline import images, labels
from pipeline.dask_cluster import dask_client
from pipeline.datasets import DATASETS, check_layout, read_frames
from pipeline.datasets import get as dataset_entry
from pipeline.errors import BadInputError, OutputError
from pipeline.fsio import Folder, file_fingerprint, relative_to
from pipeline.manifest import (
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    MANIFEST,
    RUN,
    canonical_json,
    differences,
    read_manifest,
    version_id,
    write_manifest,
)
from pipeline.progress import progress as progress_bar
from pipeline.readers import Frame
from pipeline.shards import (
    JPEG_OPTIONS,
    PNG_OPTIONS,
    encode_jpeg,
    encode_json,
    encode_label_png,
    encode_npy,
    shard_name,
    write_shard,
)
from pipeline.splits import SPLITS, check_disjoint, split_entries, split_path

log = logging.getLogger(__name__)

PROFILES = ("faithful", "fast")
DEFAULT_SIZE = "256x256"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_BAD_FRACTION = 0.01
CHUNK = 8
"""Frames per Dask task: large enough to amortise scheduling, small enough to balance load."""
PROGRESS = ".progress"
HEADER = f"{PROGRESS}/header.json"


# ---- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Everything the prepared bytes depend on (all of it goes into the manifest).

    ``size``: (height, width) of the prepared frame and label, pixels.
    ``shard_size``: split entries per shard (a shard holds fewer samples if frames are skipped).
    ``profile``: "faithful" decodes the full frame as the published loader does; "fast" lets the
    JPEG decoder downscale by a power of two (DCT scaling, Pillow draft mode) to no less than
    ``size`` first — faster, a few grey levels different (bench/prepare.py reports how much).
    """

    size: tuple[int, int] = (256, 256)
    shard_size: int = DEFAULT_SHARD_SIZE
    profile: str = "faithful"

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")

    def manifest_entry(self) -> dict[str, Any]:
        height, width = self.size
        return {
            "size": {"height": height, "width": width},
            "shard_size": self.shard_size,
            "profile": self.profile,
            "resize": "cv2.resize INTER_CUBIC on uint8 RGB",
            "jpeg": {"encoder": "pillow", **JPEG_OPTIONS, "subsampling": "4:4:4"},
            "label": {
                "png": {"encoder": "pillow", "bit_depth": 16, "scale": 65535, **PNG_OPTIONS},
                "fixations": "pipeline.labels.fixation_label",
                "gaze_map": "pipeline.labels.gaze_map_label",
            },
            "key": "v{video:04d}_f{frame:06d}",
        }


def parse_size(text: str | tuple[int, int]) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (as in "1280x720") → (height, width); a tuple is taken as (height, width)."""
    if isinstance(text, tuple):
        return text
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 256x256 (width x height), got {text!r}") from None
    return height, width


def pipeline_entry() -> dict[str, Any]:
    """The pipeline's version and the versions of the encoders/decoders that shape the bytes."""
    try:
        salmm = package_version("salmm")
    except PackageNotFoundError:
        salmm = "unknown"
    return {"name": "salmm", "version": salmm, "encoders": {
        "pillow": PIL.__version__,
        "libjpeg": str(features.version("jpg")),
        "zlib": str(features.version("zlib")),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }}


# ---- per-frame work (runs on Dask workers) -----------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One finished sample and the fingerprints [(relative path, bytes, sha256)] of its raw files."""

    sample: dict[str, Any]
    inputs: list[tuple[str, int, str]]


@dataclass(frozen=True)
class Bad:
    """A frame that cannot be prepared: its split entry, the offending file and the problem."""

    name: str
    file: str
    problem: str

    @classmethod
    def from_error(cls, name: str, err: BadInputError, root: Path) -> Bad:
        try:
            file = relative_to(err.path, root)
        except ValueError:
            file = err.path
        return cls(name, file, err.problem)


def sample_key(video: int, frame: int) -> str:
    """Sample ``__key__`` from video and frame numbers: 1, 6 → ``"v0001_f000006"``."""
    return f"v{video:04d}_f{frame:06d}"


def _fingerprint(path: Path, root: Path) -> tuple[str, int, str]:
    try:
        size, sha = file_fingerprint(path)
    except FileNotFoundError:
        raise BadInputError(path, "missing file") from None
    except OSError as err:
        raise BadInputError(path, f"cannot read file ({err.strerror})") from None
    return relative_to(path, root), size, sha


def raw_files(frame: Frame) -> list[Path]:
    """The per-frame raw files of a frame: the camera frame, and for BDDA the gaze map."""
    return [frame.image_path] + ([frame.gaze_map_path] if frame.gaze_map_path else [])


def decode_frame(frame: Frame, options: Options, raw: dict[Path, bytes],
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The camera frame (uint8 [H, W, 3] RGB) and, for BDDA, the gaze map (uint8 [h, w]), decoded
    per the profile from ``raw`` (path -> bytes of :func:`raw_files`). A frame must be
    its dataset's frame size, a gaze map at most that (:mod:`pipeline.datasets`); both are
    checked from the header before anything is decoded."""
    image, gaze = frame.image_path, frame.gaze_map_path
    size = dataset_entry(frame.dataset).frame_size
    frame_size = {"expect": size}           # checked from the header, before decoding
    map_size = {"bound": size}
    if options.profile == "fast":
        rgb = images.decode_reduced_bytes(raw[image], image, options.size, "RGB", **frame_size)
        gray = (images.decode_reduced_bytes(raw[gaze], gaze, options.size, "L", **map_size)
                if gaze else None)
    else:
        rgb = images.decode_rgb_bytes(raw[image], image, **frame_size)
        gray = images.decode_gray_bytes(raw[gaze], gaze, **map_size) if gaze else None
    return rgb, gray


def prepare_frame(frame: Frame, root: Path, options: Options) -> Prepared:
    """All per-frame work for one frame: read (once), fingerprint, decode, resize, label, encode.

    Returns the sample ``{"__key__", "jpg", "saliency.png", "fixations.npy", "json"}``;
    raises BadInputError for a missing or corrupt file.
    """
    height, width = options.size
    raw = {path: images.read_image_bytes(path) for path in raw_files(frame)}
    rgb, gray = decode_frame(frame, options, raw)
    small = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    if gray is None:
        label = labels.fixation_label(frame.fixations, size=options.size,
                                      source_size=frame.source_size)
        files = {"image": relative_to(frame.image_path, root),
                 "fixdata": relative_to(dataset_entry(frame.dataset).fixdata_file(
                     root, frame.video), root)}
    else:
        label = labels.gaze_map_label(gray, size=options.size)
        files = {"image": relative_to(frame.image_path, root),
                 "gaze_map": relative_to(frame.gaze_map_path, root)}
    inputs = [(relative_to(path, root), len(data), hashlib.sha256(data).hexdigest())
              for path, data in raw.items()]
    meta = {
        "dataset": frame.dataset, "split": frame.split, "video": frame.video,
        "frame": frame.frame, "name": frame.name,
        "source_size": list(frame.source_size), "image_size": list(rgb.shape[:2]),
        "files": files,
    }
    sample = {
        "__key__": sample_key(frame.video, frame.frame),
        "jpg": encode_jpeg(small),
        "saliency.png": encode_label_png(label),
        "fixations.npy": encode_npy(np.asarray(frame.fixations, dtype=np.int32).reshape(-1, 2)),
        "json": encode_json(meta),
    }
    return Prepared(sample, inputs)


def prepare_chunk(frames: list[Frame], root: str, options: Options) -> list[Prepared | Bad]:
    """Dask task: ``prepare_frame`` over a few frames; bad frames come back as ``Bad`` records
    (exceptions with custom constructors do not survive pickling between processes)."""
    cv2.setNumThreads(1)
    out: list[Prepared | Bad] = []
    for frame in frames:
        try:
            out.append(prepare_frame(frame, Path(root), options))
        except BadInputError as err:
            out.append(Bad.from_error(frame.name, err, Path(root)))
    return out


def fingerprint_chunk(frames: list[Frame], root: str) -> list[list[tuple[str, int, str]] | Bad]:
    """Dask task for resuming: the raw files' fingerprints of a few frames (no decoding)."""
    out: list[list[tuple[str, int, str]] | Bad] = []
    for frame in frames:
        try:
            out.append([_fingerprint(path, Path(root)) for path in raw_files(frame)])
        except BadInputError as err:
            out.append(Bad.from_error(frame.name, err, Path(root)))
    return out


def fingerprint_files(paths: list[str], root: str) -> dict[str, dict[str, Any]]:
    """Dask task: {relative path: {size, sha256}} of whole-dataset files (fixdata), skipping
    missing ones (the readers report those per frame)."""
    out = {}
    for path in paths:
        if Path(path).is_file():
            rel, size, sha = _fingerprint(Path(path), Path(root))
            out[rel] = {"size": size, "sha256": sha}
    return out


# ---- plan ------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """One split: its entries (split-file order) and the frames read lazily, shard by shard."""

    dataset: str
    root: Path
    split: str
    names: list[str]

    def entries(self) -> Iterator[tuple[str, Frame | BadInputError]]:
        """(split entry, Frame or the reader's error) for every entry, in order."""
        pending: list[BadInputError] = []
        position = 0
        for frame in read_frames(self.dataset, self.root, self.split, on_bad=pending.append):
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


def plan_splits(dataset: str, root: Path) -> tuple[dict[str, SplitPlan], list[str]]:
    """Plans of the splits whose split file exists, and the names of the absent ones (logged).
    BadInputError (split file and line) for a repeated entry or a frame in two splits."""
    entries, absent = {}, []
    for split in SPLITS:
        path = split_path(root, split)
        if not path.exists():
            log.warning("%s: no %s split file; split %s is absent", path, split, split)
            absent.append(split)
            continue
        entries[split] = split_entries(path)
    if not entries:
        raise BadInputError(root, "no split file (train.json, valid.json, test.json) found")
    check_disjoint(entries, root)
    plans = {split: SplitPlan(dataset, root, split, [name for _, name in lines])
             for split, lines in entries.items()}
    return plans, absent


# ---- journal (resume) ------------------------------------------------------------------------


@dataclass
class ShardRecord:
    """What a finished shard is made of; journal entry ``.progress/<shard>.json``."""

    name: str
    samples: int
    sha256: str
    inputs: list[list[Any]] = field(default_factory=list)  # [[path, size, sha256], ...]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def manifest_entry(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "sha256": self.sha256}


def _record_path(name: str) -> str:
    return f"{PROGRESS}/{name}.json"


def _load_journal(folder: Folder) -> dict[str, ShardRecord]:
    records = {}
    for entry in folder.listdir(PROGRESS):
        if entry.endswith(".tar.json"):
            try:
                data = json.loads(folder.read_bytes(f"{PROGRESS}/{entry}"))
                records[data["name"]] = ShardRecord(**data)
            except (ValueError, KeyError, TypeError):
                log.warning("%s: unreadable journal record, its shard will be rebuilt",
                            folder.url(f"{PROGRESS}/{entry}"))
    return records


def _records_from_manifest(folder: Folder, manifest: dict[str, Any]) -> dict[str, ShardRecord]:
    """Journal records equivalent to a finished run's manifest + inputs.jsonl."""
    data = folder.read_bytes(INPUTS) if folder.exists(INPUTS) else b""
    if hashlib.sha256(data).hexdigest() != manifest["inputs"]["files"]["sha256"]:
        log.warning("%s does not match the manifest; every shard will be rebuilt",
                    folder.url(INPUTS))
        return {}
    inputs: dict[str, list[list[Any]]] = {}
    for line in data.splitlines():
        item = json.loads(line)
        inputs.setdefault(item["shard"], []).append([item["path"], item["size"], item["sha256"]])
    records = {}
    for split in manifest["splits"].values():
        skipped: dict[str, list[dict[str, str]]] = {}
        for bad in split["skipped"]:
            skipped.setdefault(bad["shard"], []).append(
                {k: bad[k] for k in ("name", "file", "problem")})
        for shard in split["shards"]:
            records[shard["name"]] = ShardRecord(
                shard["name"], shard["samples"], shard["sha256"],
                inputs.get(shard["name"], []), skipped.get(shard["name"], []))
    return records


# ---- the run ---------------------------------------------------------------------------------


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
    profile: str = "faithful",
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
        shard_size: split entries per shard. profile: "faithful" or "fast" (see ``Options``).
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
    options = Options(parse_size(size), shard_size, profile)
    root = Path(root).resolve()
    check_layout(dataset, root)
    folder = Folder(out)
    with folder.lock():
        return _normalize_into(folder, dataset, root, options, workers=workers,
                               dask_address=dask_address, skip_bad=skip_bad,
                               max_bad_fraction=max_bad_fraction, overwrite=overwrite,
                               progress=progress)


def _normalize_into(folder: Folder, dataset: str, root: Path, options: Options, *,
                    workers: int | None, dask_address: str | None, skip_bad: bool,
                    max_bad_fraction: float, overwrite: bool, progress: bool) -> dict[str, Any]:
    """:func:`normalize` once it holds the output folder's lock."""
    started = time.perf_counter()
    plans, absent = plan_splits(dataset, root)
    total = sum(len(plan.names) for plan in plans.values())
    with dask_client(dask_address, workers) as client:
        header = _header(dataset, root, options, plans, client)
        records = _prepare_output(folder, header, overwrite)
        run = _Run(client, folder, root, options, records,
                   _BadFrames(root, total, skip_bad, max_bad_fraction), progress, total)
        try:
            splits = {split: run.split(plan) for split, plan in plans.items()}
        except BaseException:
            if not run.manifest_removed:    # nothing was rewritten: the finished output stands
                folder.remove(PROGRESS)
            raise
        finally:
            run.bar.close()
    manifest = {**header, "splits": splits, "absent_splits": absent}
    inputs_bytes = b"".join(canonical_json(dict(zip(("path", "size", "sha256", "shard"), item)))
                            + b"\n" for item in run.inputs)
    manifest["inputs"] = {**header["inputs"], "files": {
        "name": INPUTS, "count": len(run.inputs), "bytes": sum(i[1] for i in run.inputs),
        "sha256": hashlib.sha256(inputs_bytes).hexdigest()}}
    vid = version_id(manifest)
    elapsed = time.perf_counter() - started
    result = {
        "version_id": vid, "manifest": folder.url(MANIFEST),
        "samples": {s: v["samples"] for s, v in splits.items()},
        "shards": sum(len(v["shards"]) for v in splits.values()),
        "skipped": sum(len(v["skipped"]) for v in splits.values()),
        "frames_per_s": round(run.worked / elapsed, 1) if elapsed > 0 else None,
    }
    folder.write_bytes(INPUTS, inputs_bytes)
    folder.write_bytes(RUN, encode_json({
        **result, "root": str(root), "out": folder.root, "workers": workers,
        "dask_address": dask_address, "skip_bad": skip_bad, "max_bad_fraction": max_bad_fraction,
        "elapsed_s": round(elapsed, 3), "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }) + b"\n")
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


def _header(dataset: str, root: Path, options: Options, plans: dict[str, SplitPlan],
            client: Any) -> dict[str, Any]:
    """The manifest fields known before any frame is processed (what a resume must match)."""
    split_files = {}
    for split in plans:
        rel, size, sha = _fingerprint(split_path(root, split), root)
        split_files[rel] = {"size": size, "sha256": sha}
    fixdata: dict[str, dict[str, Any]] = {}
    if dataset_entry(dataset).has_fixations:
        videos = sorted({int(name.split("/")[0]) for plan in plans.values()
                         for name in plan.names if name.split("/")[0].isdigit()})
        paths = [str(dataset_entry(dataset).fixdata_file(root, video)) for video in videos]
        futures = client.map(fingerprint_files, [[p] for p in paths], root=str(root), pure=False)
        for part in client.gather(futures):
            fixdata.update(part)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pipeline": pipeline_entry(),
        "dataset": dataset,
        "options": options.manifest_entry(),
        "inputs": {"split_files": split_files, "fixdata": fixdata},
    }


def _header_of(manifest: dict[str, Any]) -> dict[str, Any]:
    header = {k: manifest.get(k) for k in
              ("format", "format_version", "pipeline", "dataset", "options")}
    inputs = manifest.get("inputs", {})
    header["inputs"] = {k: inputs.get(k) for k in ("split_files", "fixdata")}
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
        records = _records_from_manifest(folder, old)
        records.update(_load_journal(folder))
    elif folder.exists(HEADER):
        diff = differences(json.loads(folder.read_bytes(HEADER)), header)
        if diff:
            raise BadInputError(folder.url(HEADER), (
                "an unfinished run with other options or inputs left its output here"
                f" ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''});"
                " use --overwrite to discard it"))
        records = _load_journal(folder)
        log.info("resuming: %d finished shards recorded in %s", len(records),
                 folder.url(PROGRESS))
    else:
        records = {}
    folder.write_bytes(HEADER, canonical_json(header))
    return records


def _clear(folder: Folder) -> None:
    """Delete the prepared-output files in ``folder`` (and nothing else)."""
    ours = re.compile(rf"({'|'.join(SPLITS)})-\d{{6}}\.tar.*|{MANIFEST}.*|{INPUTS}.*|{RUN}.*")
    for name in folder.listdir():
        if ours.fullmatch(name):
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
        self.inputs: list[tuple[str, int, str, str]] = []
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
        self.inputs.extend((path, size, sha, name) for path, size, sha in record.inputs)

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
        info = write_shard(self.folder, name, samples)
        record = ShardRecord(info.name, info.samples, info.sha256, inputs, skipped)
        self.folder.write_bytes(_record_path(name), encode_json(asdict(record)))
        return record


# ---- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipeline normalize``."""
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="raw dataset root (holds train.json, ...)")
    parser.add_argument("--out", required=True,
                        help="prepared folder: a local path or an fsspec URL")
    parser.add_argument("--size", default=DEFAULT_SIZE,
                        help=f"prepared frame size WIDTHxHEIGHT (default {DEFAULT_SIZE})")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"split entries per shard (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--profile", choices=PROFILES, default="faithful",
                        help="faithful: full decode as the published loader (default); fast:"
                             " reduced-scale JPEG decoding (recorded, changes the version)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int,
                       help="local Dask worker processes (default: one per usable core)")
    where.add_argument("--dask-address", help="use the Dask scheduler at tcp://HOST:PORT")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad frames (listed in the manifest) instead of failing")
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                        help="with --skip-bad, fail if more than this fraction of frames is bad"
                             f" (default {DEFAULT_MAX_BAD_FRACTION})")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard prepared output of other options or inputs in --out")


def run(args: argparse.Namespace) -> int:
    """``python -m pipeline normalize``: exit code (the version id is logged at the end)."""
    try:
        options = Options(parse_size(args.size), args.shard_size, args.profile)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if not 0 <= args.max_bad_fraction <= 1:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    except ValueError as err:
        log.error("normalize: %s", err)
        return 2
    normalize(args.dataset, args.root, args.out, size=options.size,
              shard_size=options.shard_size, profile=options.profile, workers=args.workers,
              dask_address=args.dask_address, skip_bad=args.skip_bad,
              max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite)
    return 0
