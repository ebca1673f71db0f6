"""Random access into a prepared split: where each sample's bytes lie in its shard.

``PREPARED/<split>-index.npy`` (:func:`index_name`) holds one row per sample of the split, in
split order (the order of the shards in the manifest, then tar order), as a numpy structured
array of :data:`INDEX_DTYPE`:

==========  ================================================================================
``shard``   uint32: the shard's place in the manifest's list of the split's shards
``offset``  uint64: byte offset of the sample's first tar header in the shard
``length``  uint32: bytes from there to the end of its last member's padded data (its span)
``sha256``  uint8 [32]: sha256 of those bytes
==========  ================================================================================

The manifest records the index file's name and sha256 (``splits.<split>.index``), so the index
is part of the version, and every random read checks the span it reads against its sha256:
what the streaming reader gets from hashing whole shards, a random reader gets per sample.
The index is made by :func:`scan_shard` from the committed shards (normalize does it last, so
shards reused on resume are indexed the same way), and :func:`pipeline.verify` re-scans and
compares.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import IO, Any

import fsspec
import numpy as np

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.shards import Shard, member_problem

INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"),
                        ("sha256", "u1", (32,))])
"""(Raw bytes, not numpy's ``S32``, which drops a digest's trailing zero bytes.)"""
BLOCK = tarfile.BLOCKSIZE
OPEN_FILES = 8
"""Shard files a :class:`SampleReader` keeps open (least recently used closed first)."""


def index_name(split: str) -> str:
    """``train`` -> ``train-index.npy``."""
    return f"{split}-index.npy"


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def scan_shard(shard: Shard, position: int) -> np.ndarray:
    """The index rows of one committed shard (``position``: its place in the split's list).

    Two passes over the file, a sample's bytes in memory at a time: the member headers give each
    sample's span (tarfile seeks over the data), then the bytes are read in order and hashed per
    span and whole. BadInputError (naming the shard) unless every member is a plain
    ``<key>.<field>`` file and the whole file matches the sha256 and sample count the manifest
    records.
    """
    try:
        with fsspec.open(shard.url, "rb") as f:
            spans = _spans(f, shard.url)
            f.seek(0)
            whole = hashlib.sha256()
            rows = np.zeros(len(spans), dtype=INDEX_DTYPE)
            at = 0
            for row, (start, end) in zip(rows, spans):
                whole.update(f.read(start - at))
                data = f.read(end - start)
                whole.update(data)
                at = end
                row["shard"], row["offset"], row["length"] = position, start, end - start
                row["sha256"] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
            while chunk := f.read(1 << 20):
                whole.update(chunk)
    except FileNotFoundError:
        raise BadInputError(shard.url, "shard listed in the manifest is missing") from None
    if shard.sha256 is not None and whole.hexdigest() != shard.sha256:
        raise BadInputError(shard.url, "differs from the manifest's sha256; re-run normalize")
    if len(spans) != shard.samples:
        raise BadInputError(shard.url, f"has {len(spans)} samples, the manifest says"
                            f" {shard.samples}")
    return rows


def _spans(f: IO[bytes], url: str) -> list[tuple[int, int]]:
    """(start, end) byte span of each sample's members in a tar, in order."""
    spans: list[list[Any]] = []          # [key, start, end]
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                problem = member_problem(member)
                if problem is not None:
                    raise BadInputError(url, problem)
                key = member.name.partition(".")[0]
                end = member.offset_data + _padded(member.size)
                if spans and spans[-1][0] == key:
                    spans[-1][2] = end
                else:
                    spans.append([key, member.offset, end])
    except tarfile.TarError as err:
        raise BadInputError(url, f"unreadable shard: {err}") from None
    return [(start, end) for _, start, end in spans]


def build_index(shards: Sequence[Shard]) -> np.ndarray:
    """The index of a split from its shards in manifest order."""
    parts = [scan_shard(shard, i) for i, shard in enumerate(shards)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=INDEX_DTYPE)


def write_index(folder: Folder, split: str, index: np.ndarray) -> dict[str, Any]:
    """Write ``index`` as ``<split>-index.npy`` atomically; its manifest entry {"name",
    "sha256"}."""
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    data = buf.getvalue()
    folder.write_bytes(index_name(split), data)
    return {"name": index_name(split), "sha256": hashlib.sha256(data).hexdigest()}


def read_index(prepared: str, manifest: Mapping[str, Any], split: str) -> np.ndarray:
    """The split's index, checked against the sha256 and sample count the manifest records
    (BadInputError naming the file otherwise)."""
    entry = manifest["splits"][split].get("index")
    folder = Folder(prepared)
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
            or entry["name"] != index_name(split):
        raise BadInputError(folder.url("manifest.json"), f"split {split!r} has no index of"
                            " member offsets; re-run normalize")
    where = folder.url(entry["name"])
    if not folder.exists(entry["name"]):
        raise BadInputError(where, "missing (listed in the manifest); re-run normalize")
    data = folder.read_bytes(entry["name"])
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise BadInputError(where, "differs from the manifest's sha256: the index changed after"
                            " normalize wrote it")
    index = np.load(io.BytesIO(data), allow_pickle=False)
    if index.dtype != INDEX_DTYPE or index.ndim != 1 \
            or len(index) != manifest["splits"][split]["samples"]:
        raise BadInputError(where, f"not an index of the split's"
                            f" {manifest['splits'][split]['samples']} samples")
    return index


def parse_span(data: bytes, where: str) -> dict[str, Any]:
    """The sample in one span of tar bytes: ``{"__key__", ext: bytes, ...}``."""
    sample: dict[str, Any] = {}
    pos = 0
    while pos + BLOCK <= len(data):
        try:
            info = tarfile.TarInfo.frombuf(data[pos:pos + BLOCK], "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise BadInputError(where, f"bad tar header in an indexed sample ({err})") from None
        problem = member_problem(info)
        if problem is not None:
            raise BadInputError(where, problem)
        key, _, ext = info.name.partition(".")
        if sample.setdefault("__key__", key) != key:
            raise BadInputError(where, f"indexed span holds samples {sample['__key__']} and"
                                f" {key}")
        start = pos + BLOCK
        sample[ext] = data[start:start + info.size]
        pos = start + _padded(info.size)
    if "__key__" not in sample:
        raise BadInputError(where, "indexed span holds no sample")
    return sample


class SampleReader:
    """Reads single samples of a split by their row, through its index: open shard files are
    kept (up to :data:`OPEN_FILES`), each span is checked against its sha256. Picklable: a
    data worker opens its own files."""

    def __init__(self, shards: Sequence[Shard], index: np.ndarray) -> None:
        self.shards = list(shards)
        self.index = index
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, position: int) -> IO[bytes]:
        if position in self._files:
            self._files.move_to_end(position)
            return self._files[position]
        url = self.shards[position].url
        try:
            f = fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise BadInputError(url, "shard listed in the manifest is missing") from None
        self._files[position] = f
        while len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def read(self, row: int) -> dict[str, Any]:
        """Sample ``row`` of the split: ``{"__key__", "__url__", "__index__", ext: bytes}``."""
        entry = self.index[row]
        shard = self.shards[int(entry["shard"])]
        f = self._file(int(entry["shard"]))
        f.seek(int(entry["offset"]))
        data = f.read(int(entry["length"]))
        if hashlib.sha256(data).digest() != entry["sha256"].tobytes():
            raise BadInputError(shard.url, f"sample {row - shard.first} of the shard differs"
                                " from the index's sha256: the shard changed after normalize"
                                " wrote it (`python -m pipeline verify` lists every difference)")
        sample = parse_span(data, shard.url)
        return {**sample, "__url__": shard.url, "__index__": row}

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()
