"""normalize's journal, what a killed run resumes from: per finished shard, a record under
``.progress/`` of its sha256, the fingerprints of the raw files it was made from and the frames
it skipped; a finished run's manifest and ``inputs.jsonl`` give the same records."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Self

from pipeline.core.fsio import Folder
from pipeline.formats.manifest import INPUTS, canonical_json

log = logging.getLogger("pipeline.normalize")

PROGRESS = ".progress"
HEADER = f"{PROGRESS}/header.json"


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


class InputsWriter:
    """``inputs.jsonl`` written while the shards finish - one canonical line per raw file,
    hashed on the way, so the run's memory does not grow with the dataset - and committed
    (renamed into place) when the ``with`` block ends without an error; an error discards it."""

    def __init__(self, folder: Folder) -> None:
        self._writer = folder.atomic_writer(INPUTS)
        self._digest = hashlib.sha256()
        self.count = self.bytes = 0

    def __enter__(self) -> Self:
        self._file = self._writer.__enter__()
        return self

    def add(self, path: str, size: int, sha256: str, shard: str) -> None:
        """One raw file of ``shard``."""
        line = canonical_json({"path": path, "sha256": sha256, "shard": shard, "size": size})
        self._file.write(line + b"\n")
        self._digest.update(line + b"\n")
        self.count += 1
        self.bytes += size

    def entry(self) -> dict[str, Any]:
        """What the manifest records of the file: name, count, bytes of the files, sha256."""
        return {"name": INPUTS, "count": self.count, "bytes": self.bytes,
                "sha256": self._digest.hexdigest()}

    def __exit__(self, *exc: object) -> bool:
        return bool(self._writer.__exit__(*exc))


def record_path(name: str) -> str:
    """Where the journal keeps shard ``name``'s record."""
    return f"{PROGRESS}/{name}.json"


def load_journal(folder: Folder) -> dict[str, ShardRecord]:
    """The records under ``.progress/`` (shard name -> record); unreadable ones are logged and
    left out, so their shards are rebuilt."""
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


def records_from_manifest(folder: Folder, manifest: dict[str, Any]) -> dict[str, ShardRecord]:
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
