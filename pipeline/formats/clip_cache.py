"""CLIP embedding cache: a Zarr v3 store holding, per prepared sample, the frozen CLIP image
embedding of the frame and of its horizontal flip, so training never runs the semantic branch.

Layout (``CACHE.zarr``)::

    zarr.json                    root group; attributes = the cache header (below) + "complete"
    <split>/keys                 str [N]           sample ``__key__`` in shard order, chunks (C,)
    <split>/embeddings           float32 [N, 2, D] index 0: frame, 1: horizontally flipped frame,
                                                   chunks (C, 2, D), Blosc(zstd, level 5, bitshuffle)
    <split>/done                 uint8 [ceil(N/C)] 1 once chunk i of keys+embeddings is written,
                                                   one file per element

The header records everything the numbers depend on: encoder identity (model, weights,
profile, open_clip version, embed_dim), storage dtype, compute (device type, autocast dtype),
the prepared dataset (version id, manifest sha256), torch/open_clip versions, split sizes and
the chunk size C. A run resumes only into a store whose header equals its own; readers refuse a
store whose ``complete`` attribute is not true, and a store made from another dataset version.

Writes are chunk-aligned. Zarr's local store writes every object to a temporary name and
renames it, and a chunk's ``done`` flag is written only after its keys and embeddings, so a
killed run leaves whole chunks (flagged or not) and never a flagged half-chunk.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.core.errors import BadInputError, OutputError
from pipeline.core.fsio import Folder
from pipeline.datasets.splits import SPLITS
from pipeline.formats.manifest import read_manifest, version_id

log = logging.getLogger(__name__)

FORMAT = "salmm-clip-cache"
FORMAT_VERSION = 2
"""2: the encoder records its MLP activation (QuickGELU for the published CLIP) and is fed
the prepared dataset's lossless frames (prepared format 2)."""
DEFAULT_CHUNK_SIZE = 256
DTYPES = ("float32", "float16")

_COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from Zarr attributes (tuples become lists, and so on)."""
    return json.loads(json.dumps(value))


def _diff(recorded: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two header dicts."""
    out = []
    for name in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(name), wanted.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} {a!r} != {b!r}")
    return out


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path.removeprefix("file://"))


class CacheWriter:
    """Chunk-granular, resumable writer of one cache store.

    Use :meth:`open` (creates a new store or resumes a matching one), :meth:`missing_chunks`,
    :meth:`write_chunk` for each missing chunk, then :meth:`finish`.
    """

    def __init__(self, path: str, group: zarr.Group, header: dict[str, Any]) -> None:
        self.path = path
        self.group = group
        self.header = header
        self.chunk_size: int = header["chunk_size"]
        self.dim: int = header["encoder"]["embed_dim"]

    @classmethod
    def open(cls, path: str | Path, header: Mapping[str, Any], *,
             replace: bool = False) -> CacheWriter:
        """Create the store at ``path`` or resume the unfinished (or finished) one there.

        ``header`` must hold "encoder" (with "embed_dim"), "dtype", "compute", "prepared",
        "software", "splits" ({split: N}) and "chunk_size". An existing store is reused only if
        its header is equal; otherwise it is replaced when ``replace`` (the caller knows it is
        stale), else BadInputError names the differing fields.
        """
        path = str(path)
        header = _jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, **header})
        if header["dtype"] not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {header['dtype']!r}")
        try:
            group = zarr.open_group(path, mode="r+")
        except FileNotFoundError:
            group = None
        if group is not None:
            recorded = dict(group.attrs)
            if recorded.get("format") != FORMAT:
                raise BadInputError(path, "exists and is not a salmm CLIP cache; remove it or"
                                    " choose another --out")
            recorded.pop("complete", None)
            differences = _diff(recorded, header)
            if differences and not replace:
                raise BadInputError(path, "cannot resume: the store was made with other settings"
                                    f" ({'; '.join(differences)}); pass --overwrite to replace it,"
                                    " or choose another --out")
            if differences:
                log.warning("%s: replacing the store made with other settings (%s)", path,
                            "; ".join(differences))
                group = zarr.create_group(path, attributes={**header, "complete": False},
                                          overwrite=True)
        if group is None:
            # the header goes into the root's one metadata write: a store never lacks it
            group = zarr.create_group(path, attributes={**header, "complete": False})
            log.info("created %s", path)
        _remove_partial_files(path)
        _create_missing_arrays(group, header)
        writer = cls(path, group, header)
        done = sum(int(writer._done(s).sum()) for s in header["splits"])
        total = sum(writer.n_chunks(s) for s in header["splits"])
        if done:
            log.info("resuming %s: %d of %d chunks already written", path, done, total)
        return writer

    def n_chunks(self, split: str) -> int:
        """Number of chunks of ``split`` (the last one may be short)."""
        return math.ceil(self.header["splits"][split] / self.chunk_size)

    def chunk_range(self, split: str, index: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``index`` of ``split``."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.header["splits"][split])

    def _done(self, split: str) -> np.ndarray:
        return self.group[split]["done"][:]

    def missing_chunks(self, split: str) -> list[int]:
        """Indices of the chunks of ``split`` not yet written, ascending."""
        return [int(i) for i in np.flatnonzero(self._done(split) == 0)]

    def write_chunk(self, split: str, index: int, keys: Sequence[str], emb: np.ndarray) -> None:
        """Write chunk ``index`` of ``split``: ``keys`` [n] and ``emb`` [n, 2, D] (any float
        dtype; stored as the header's dtype), then flag it done."""
        start, stop = self.chunk_range(split, index)
        emb = np.asarray(emb)
        if len(keys) != stop - start or emb.shape != (stop - start, 2, self.dim):
            raise ValueError(f"chunk {split}/{index} needs {stop - start} keys and embeddings "
                             f"[{stop - start}, 2, {self.dim}], got {len(keys)} and {emb.shape}")
        if not np.isfinite(emb).all():
            raise ValueError(f"chunk {split}/{index}: the encoder returned non-finite values")
        sub = self.group[split]
        try:
            sub["keys"][start:stop] = np.asarray(keys, dtype=np.dtypes.StringDType())
            sub["embeddings"][start:stop] = emb.astype(self.header["dtype"])
            sub["done"][index] = 1
        except OSError as err:
            raise OutputError(f"{self.path}/{split}/embeddings/c/{index}", f"cannot be written"
                              f" ({err.strerror or type(err).__name__})") from None

    def finish(self) -> None:
        """Mark the store complete; ValueError if any chunk is missing."""
        missing = {s: len(self.missing_chunks(s)) for s in self.header["splits"]}
        if any(missing.values()):
            raise ValueError(f"{self.path}: chunks still missing {missing}")
        try:
            self.group.attrs["complete"] = True
        except OSError as err:
            raise OutputError(self.path, "cannot be marked complete"
                              f" ({err.strerror or type(err).__name__})") from None


def _create_missing_arrays(group: zarr.Group, header: dict[str, Any]) -> None:
    """Create the split groups and arrays the store lacks (all of them for a new store; a run
    killed while creating them left some)."""
    chunk = header["chunk_size"]
    dim = header["encoder"]["embed_dim"]
    for split, n in header["splits"].items():
        sub = group.require_group(split)
        if "keys" not in sub:
            sub.create_array("keys", shape=(n,), chunks=(chunk,), dtype=str)
        if "embeddings" not in sub:
            sub.create_array("embeddings", shape=(n, 2, dim), chunks=(chunk, 2, dim),
                             dtype=header["dtype"], compressors=_COMPRESSOR, fill_value=0.0)
        if "done" not in sub:
            sub.create_array("done", shape=(math.ceil(n / chunk),), chunks=(1,), dtype="uint8",
                             fill_value=0)


def _remove_partial_files(path: str) -> None:
    """Delete temporary files a killed writer left behind in a local store."""
    if _is_local(path):
        for leftover in _local_path(path).rglob("*.partial"):
            leftover.unlink(missing_ok=True)


class ClipCache:
    """Read access to a complete cache store (see :func:`open_cache`).

    ``identity`` is the recorded header: "encoder" {model, weights, profile, open_clip,
    embed_dim}, "dtype", "compute", "prepared" {version_id, manifest_sha256}, "software",
    "splits" {split: N}, "chunk_size".
    """

    def __init__(self, path: str, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self.identity: dict[str, Any] = {k: v for k, v in group.attrs.items() if k != "complete"}
        self._index: dict[str, tuple[str, int]] | None = None
        self._chunk = functools.lru_cache(maxsize=8)(self._read_chunk)

    @property
    def splits(self) -> list[str]:
        return list(self.identity["splits"])

    @property
    def embed_dim(self) -> int:
        return int(self.identity["encoder"]["embed_dim"])

    def keys(self, split: str) -> list[str]:
        """Sample keys of ``split`` in shard order."""
        return self._split(split)["keys"][:].tolist()

    def load_split(self, split: str) -> tuple[list[str], np.ndarray]:
        """Whole split in memory: (keys [N], embeddings float32 [N, 2, D]); [:, 0] is the frame,
        [:, 1] its horizontal flip."""
        sub = self._split(split)
        return sub["keys"][:].tolist(), sub["embeddings"][:].astype(np.float32, copy=False)

    def get(self, key: str) -> np.ndarray:
        """Embeddings of one sample: float32 [2, D] (frame, flipped frame). KeyError if absent."""
        if self._index is None:
            self._index = {k: (s, i) for s in self.splits for i, k in enumerate(self.keys(s))}
        split, i = self._index[key]
        chunk = self.identity["chunk_size"]
        return self._chunk(split, i // chunk)[i % chunk].copy()

    def _read_chunk(self, split: str, index: int) -> np.ndarray:
        return self.read_chunk(split, index)[1]

    def read_chunk(self, split: str, index: int) -> tuple[list[str], np.ndarray]:
        """Chunk ``index`` of ``split``: its keys and embeddings float32 [n, 2, D] (n is the
        chunk size, less for the last chunk); reads that chunk of both arrays and nothing else."""
        chunk = self.identity["chunk_size"]
        sub = self._split(split)
        rows = slice(index * chunk, (index + 1) * chunk)
        return (sub["keys"][rows].tolist(),
                sub["embeddings"][rows].astype(np.float32, copy=False))

    def _split(self, split: str) -> zarr.Group:
        if split not in self.identity["splits"]:
            raise KeyError(f"{self.path}: no split {split!r} (has {self.splits})")
        return self._group[split]


def recorded_version(path: str | Path) -> str | None:
    """The prepared dataset version a store at ``path`` was made from; None when there is no
    salmm cache there."""
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs
    except (FileNotFoundError, ValueError):
        return None
    prepared = attrs.get("prepared") if attrs.get("format") == FORMAT else None
    return prepared.get("version_id") if isinstance(prepared, dict) else None


def open_cache(path: str | Path | zarr.abc.store.Store,
               prepared: str | Path | Mapping[str, Any] | None = None) -> ClipCache:
    """Open a finished cache for reading (``path``: its location, or a zarr store).

    ``prepared``: the prepared dataset (its path, or its manifest dict); when given, a cache
    made from another version of it is refused. BadInputError (one line naming the store) for
    a missing, foreign, unfinished or mismatching store.
    """
    store, path = (path, str(path)) if isinstance(path, zarr.abc.store.Store) else (str(path),) * 2
    try:
        group = zarr.open_group(store, mode="r")
    except FileNotFoundError:
        raise BadInputError(path, "no CLIP cache here; run `python -m pipeline embed`") from None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise BadInputError(path, "is not a salmm CLIP cache")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise BadInputError(path, f"cache format version {attrs.get('format_version')} is not"
                            f" the supported {FORMAT_VERSION} (older caches ran CLIP with GELU,"
                            " not the authors' QuickGELU); re-run `python -m pipeline embed"
                            " --overwrite`")
    if attrs.get("complete") is not True:
        raise BadInputError(path, "the cache is incomplete (its embed run did not finish);"
                            " re-run `python -m pipeline embed` to finish it")
    check_layout(path, group, attrs)
    cache = ClipCache(path, group)
    if prepared is not None:
        if not isinstance(prepared, Mapping):
            prepared = read_manifest(str(prepared))
        check_cache(cache, prepared)
    return cache


MAX_CHUNK = 1 << 16
MAX_DIM = 1 << 13
MAX_ROWS = 1 << 28
"""Bounds a header must keep: chunks, embedding width, rows of a split (more than any dataset)."""


def _count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_layout(path: str, group: zarr.Group, attrs: Mapping[str, Any]) -> None:
    """BadInputError (one line naming the store) unless the header's numbers are sane and every
    split's arrays are exactly what :class:`CacheWriter` makes: ``keys`` [N] strings in chunks of
    C, ``embeddings`` [N, 2, D] of the header's dtype in chunks (C, 2, D) with the one codec
    chain salmm writes, ``done`` [ceil(N / C)] uint8. Only metadata is read: a tampered header
    costs no allocation and runs no code."""
    chunk, dim = attrs.get("chunk_size"), (attrs.get("encoder") or {}).get("embed_dim")
    splits = attrs.get("splits")
    if not _count(chunk, 1, MAX_CHUNK) or not _count(dim, 1, MAX_DIM) \
            or attrs.get("dtype") not in DTYPES or not isinstance(splits, dict) \
            or not all(k in SPLITS and _count(n, 0, MAX_ROWS) for k, n in splits.items()):
        raise BadInputError(path, "malformed cache header (chunk_size, encoder.embed_dim, dtype"
                            " or splits out of range)")
    expected = {"keys": ((None,), (chunk,), None), "embeddings": ((None, 2, dim),
                                                                  (chunk, 2, dim), attrs["dtype"]),
                "done": ((None,), (1,), "uint8")}
    codecs = _codec_names(_COMPRESSOR)
    for split, rows in splits.items():
        for name, (shape, chunks, dtype) in expected.items():
            where = f"{path}/{split}/{name}"
            try:
                array = group[split][name]
            except Exception as err:  # noqa: BLE001 - zarr fails in many ways on bad metadata
                raise BadInputError(where, f"unreadable array metadata ({type(err).__name__})"
                                    ) from None
            want = tuple(rows if v is None else v for v in shape)
            if name == "done":
                want = (math.ceil(rows / chunk),)
            if tuple(array.shape) != want or tuple(array.chunks) != chunks:
                raise BadInputError(where, f"shape {list(array.shape)} in chunks"
                                    f" {list(array.chunks)}, the header says {list(want)} in"
                                    f" {list(chunks)}")
            if dtype is not None and str(array.dtype) != dtype:
                raise BadInputError(where, f"dtype {array.dtype}, the header says {dtype}")
            if name == "keys" and array.dtype.kind not in "TUO":
                raise BadInputError(where, f"dtype {array.dtype}, not strings")
            if name == "embeddings" and _codec_names(array.compressors) != codecs:
                raise BadInputError(where, f"codecs {_codec_names(array.compressors)}, salmm"
                                    f" writes {codecs}")


def _codec_names(codecs: Any) -> list[str]:
    items = codecs if isinstance(codecs, (list, tuple)) else [codecs]
    return [type(c).__name__ + (f":{c.cname}" if hasattr(c, "cname") else "") for c in items]


def default_cache_path(prepared: str | Path, identity: Mapping[str, Any],
                       dtype: str = "float32") -> str:
    """Where ``python -m pipeline embed`` writes the cache of an encoder identity (its "model",
    "profile" and "weights"): PREPARED/clip/<model>-<profile>-<weights>[-float16].zarr, e.g.
    ``clip/ViT-B-32-salmm-openai.zarr``, ``clip/ViT-B-32-salmm-sha256-0123456789ab.zarr``,
    ``clip/ViT-B-32-salmm-random-seed0.zarr``."""
    weights = str(identity["weights"])
    if weights.startswith("sha256:"):
        weights = "sha256-" + weights.removeprefix("sha256:")[:12]
    weights = re.sub(r"[^A-Za-z0-9._]+", "-", weights).strip("-")
    name = f"{identity['model']}-{identity['profile']}-{weights}"
    if dtype != "float32":
        name += f"-{dtype}"
    return f"{str(prepared).rstrip('/')}/clip/{name}.zarr"


def open_checked_cache(path: str | None, prepared: str, manifest: Mapping[str, Any],
                       identity: Mapping[str, Any], splits: Sequence[str]
                       ) -> tuple[str, dict[str, Any]]:
    """(path, recorded header) of the CLIP cache a run uses - ``path``, or the default one for
    the encoder ``identity`` ({"model", "weights", "profile"}) - after checking that it is
    complete, was made from this prepared dataset version with that encoder, and holds every
    sample of ``splits``. BadInputError (one line naming the store) otherwise."""
    default = path is None
    path = path or default_cache_path(prepared, identity)
    if default and not Folder(path).exists("zarr.json"):
        raise BadInputError(path, f"no CLIP cache for these CLIP options; {_caches_there(prepared)}"
                            f" make it with `python -m pipeline embed --prepared {prepared}`"
                            " (offline: add --clip-pretrained none for random weights, or"
                            " --clip-pretrained /path/to/ViT-B-32.pt)")
    cache = open_cache(path)
    check_cache(cache, manifest, model=identity["model"], profile=identity["profile"],
                weights=identity["weights"], activation=identity.get("activation"))
    recorded = cache.identity["splits"]
    for split in splits:
        have, want = recorded.get(split), manifest["splits"][split]["samples"]
        if have is None:
            raise BadInputError(path, f"has no embeddings of split {split!r} (has"
                                f" {', '.join(sorted(recorded))}); run `python -m pipeline"
                                f" embed --split {split}`")
        if have != want:
            raise BadInputError(path, f"holds {have} {split} embeddings, the prepared data has"
                                f" {want}; re-run `python -m pipeline embed`")
    return path, cache.identity


def _caches_there(prepared: str) -> str:
    """What caches the prepared folder holds, and the options that use each, as a sentence."""
    folder = Folder(f"{str(prepared).rstrip('/')}/clip")
    found = [name for name in folder.listdir() if name.endswith(".zarr")]
    if not found:
        return "the prepared folder has none;"
    uses = []
    for name in found:
        try:
            encoder = open_cache(folder.url(name)).identity["encoder"]
        except BadInputError:
            uses.append(f"{name} (unfinished or unreadable)")
            continue
        weights = encoder["weights"]
        option = "none" if str(weights).startswith("random") else weights
        uses.append(f"{name} (use it with --clip-pretrained {option}"
                    f"{'' if encoder['profile'] == 'salmm' else ' --profile ' + encoder['profile']})")
    return f"it holds {'; '.join(uses)};"


def check_cache(cache: ClipCache, manifest: Mapping[str, Any], *, model: str | None = None,
                profile: str | None = None, weights: str | None = None,
                activation: str | None = None) -> None:
    """Raise BadInputError (one line) unless ``cache`` was made from this prepared dataset
    version (and, when given, with this CLIP model name, preprocessing profile, weights and
    MLP activation)."""
    recorded = cache.identity["prepared"]["version_id"]
    wanted = version_id(dict(manifest))
    if recorded != wanted:
        raise BadInputError(cache.path, f"made from prepared dataset version {recorded}, but the"
                            f" prepared dataset is version {wanted}; re-run"
                            " `python -m pipeline embed`")
    encoder = cache.identity["encoder"]
    for name, value in (("model", model), ("profile", profile), ("weights", weights),
                        ("activation", activation)):
        if value is not None and encoder.get(name) != value:
            raise BadInputError(cache.path, f"made with CLIP {name} {encoder.get(name)!r}, but"
                                f" {value!r} is required")
