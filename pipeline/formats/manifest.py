"""The prepared dataset's manifest: what ``manifest.json`` holds, its version id, shard URLs.

``PREPARED/manifest.json`` (written last, atomically: its presence means the run finished)::

    format          "salmm-prepared", format_version 2
    pipeline        {"name": "salmm", "version": ..., "encoders": {pillow, libjpeg, zlib, opencv, numpy}}
    dataset         "trafficgaze" | "drfixd-rainy" | "bdda" | "dreyeve" | "dada"
    options         everything the bytes depend on: size {height, width}, shard_size, profile
                    (decode), frame codec and its encoder options, label method
    inputs          split_files {name: {size, sha256}} (absent splits are not listed),
                    fixdata {relative path: {size, sha256}},
                    files {"name": "inputs.jsonl", "count", "bytes", "sha256"} — pins the per-file
                    list of every frame / gaze-map file (see below)
    splits          {split: {"entries", "samples", "shards": [{name, samples, sha256}, ...],
                             "skipped": [{name, shard, file, problem}, ...],
                             "index": {name, sha256}}}  (member offsets: pipeline.formats.shard_index)
    absent_splits   splits whose split file does not exist in the raw root
    synthetic       true when made from ``pipeline synth``'s generated data (absent otherwise)
    version_id      version_id(manifest): 16 hex of sha256 of the canonical JSON of all the above

``PREPARED/inputs.jsonl``: one canonical JSON line per raw frame / gaze-map file in shard order,
``{"path": <relative to the raw root>, "sha256", "shard", "size"}``.

Nothing run-dependent is in either file (no time, host, worker count or absolute path); such
facts go to ``PREPARED/run.json``, which is not part of the version.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.datasets.splits import SPLITS

MANIFEST = "manifest.json"
SHARD_NAME = re.compile(rf"({'|'.join(SPLITS)})-\d{{6}}\.tar")
"""What a shard's file name looks like: ``<split>-NNNNNN.tar``; every name a manifest lists must
be one (so nothing it names lies outside its folder)."""
INPUTS = "inputs.jsonl"
RUN = "run.json"
FORMAT = "salmm-prepared"
FORMAT_VERSION = 2
"""2: lossless frames (PNG) by default, fixations as recorded (float, none dropped), labels
computed when read. Format 1 (JPEG frames, 16-bit labels, fixations inside the frame only)
is refused with the command that re-makes it."""
VERSION_KEY = "version_id"


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes that are hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def version_id(manifest: dict[str, Any]) -> str:
    """Dataset version id: first 16 hex digits of sha256 of the manifest's canonical JSON,
    leaving out the ``version_id`` field itself (so it can be stored inside)."""
    content = {k: v for k, v in manifest.items() if k != VERSION_KEY}
    return hashlib.sha256(canonical_json(content)).hexdigest()[:16]


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The file content: the manifest with its version id, sorted keys, one-space indent."""
    stamped = {**manifest, VERSION_KEY: version_id(manifest)}
    return (json.dumps(stamped, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def write_manifest(folder: Folder, manifest: dict[str, Any]) -> str:
    """Atomically write ``manifest.json`` (with its version id) into ``folder``; the id."""
    folder.write_bytes(MANIFEST, manifest_bytes(manifest))
    return version_id(manifest)


def read_manifest(prepared: str) -> dict[str, Any]:
    """The manifest of a prepared dataset (a local path or fsspec URL).

    BadInputError (one line naming the file) if it is missing, not JSON, or not a salmm
    prepared-dataset manifest. The content is not checked against the shards: that is
    ``pipeline.verify``.
    """
    folder = Folder(prepared)
    where = folder.url(MANIFEST)
    if not folder.exists(MANIFEST):
        raise BadInputError(where, "missing: not a prepared dataset, or its normalize run did"
                            " not finish; run `python -m pipeline normalize`")
    try:
        manifest = json.loads(folder.read_bytes(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(where, f"not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(where, f"not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadInputError(where, f"format version {manifest.get('format_version')} is not the"
                            f" supported {FORMAT_VERSION} (format 1 stored JPEG frames and"
                            " dropped out-of-frame fixations); prepare it again with `python -m"
                            " pipeline normalize --dataset D --root RAW --out"
                            f" {prepared} --overwrite`, then `python -m pipeline embed`")
    problem = malformed(manifest)
    if problem:
        raise BadInputError(where, f"malformed manifest: {problem}")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def malformed(manifest: dict[str, Any], *, inputs: bool = False) -> str | None:
    """What is missing or of the wrong type in ``manifest`` for the readers (options.size,
    splits with their shards' name, samples and sha256; with ``inputs``, also what verify
    reads: inputs.files name and sha256); None when nothing is."""
    size = manifest.get("options", {}).get("size") if isinstance(manifest.get("options"),
                                                                  dict) else None
    if not isinstance(size, dict) or not all(_is_count(size.get(k)) for k in ("height", "width")):
        return "options.size needs whole-number height and width"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return "no splits"
    for split, entry in splits.items():
        if split not in SPLITS:
            return f"unknown split {split!r} (splits are {', '.join(SPLITS)})"
        if not isinstance(entry, dict) or not _is_count(entry.get("samples")) \
                or not isinstance(entry.get("shards"), list):
            return f"splits.{split} needs samples and a list of shards"
        for i, shard in enumerate(entry["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) \
                    or not _is_count(shard.get("samples")) \
                    or not isinstance(shard.get("sha256"), str):
                return f"splits.{split}.shards[{i}] needs name, samples and sha256"
            if not SHARD_NAME.fullmatch(shard["name"]) \
                    or not shard["name"].startswith(f"{split}-"):
                return (f"splits.{split}.shards[{i}] is named {shard['name']!r}, not"
                        f" {split}-NNNNNN.tar in the prepared folder")
        if sum(shard["samples"] for shard in entry["shards"]) != entry["samples"]:
            return f"splits.{split}: its shards hold {sum(s['samples'] for s in entry['shards'])}" \
                   f" samples, it says {entry['samples']}"
    if inputs:
        files = manifest.get("inputs", {}).get("files") if isinstance(manifest.get("inputs"),
                                                                      dict) else None
        if not isinstance(files, dict) or not isinstance(files.get("name"), str) \
                or not isinstance(files.get("sha256"), str):
            return "inputs.files needs name and sha256"
    return None


def prepared_size(manifest: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the prepared frames and labels."""
    size = manifest["options"]["size"]
    return int(size["height"]), int(size["width"])


def shard_urls(prepared: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Addresses of a split's shards in order (local paths, or URLs in the form of ``prepared``).

    KeyError naming the available splits if the dataset has no such split.
    """
    splits = manifest["splits"]
    if split not in splits:
        raise KeyError(f"{prepared}: no split {split!r} (has {sorted(splits)})")
    folder = Folder(prepared)
    return [folder.url(shard["name"]) for shard in splits[split]["shards"]]


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Human-readable list of where two JSON-like values differ: ``"options.size.height: 256 → 128"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            path = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{path}: added")
            elif key not in new:
                out.append(f"{path}: removed")
            else:
                out.extend(differences(old[key], new[key], path))
        return out
    if old != new:
        return [f"{where or '(top)'}: {_short(old)} → {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
