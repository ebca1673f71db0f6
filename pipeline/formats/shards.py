"""The sample codec: what a prepared sample holds, WebDataset shards as small composable stages
(encode fields → group into samples → write a deterministic tar → commit it atomically under
its final name), and the one way to read a shard back: :func:`read_shard`, which hashes every
byte as it reads and hands out a shard's last sample only once the whole file matched the
sha256 its manifest records.

A sample is a dict ``{"__key__": str, "<field>": bytes, ...}`` with the fields

=================  ===========================================================================
``png``            the frame exactly as the authors' loader feeds it: ``cv2.resize(imread(frame),
                   INTER_CUBIC)``, uint8 RGB [H, W, 3], lossless PNG (the default frame codec)
``jpg``            instead of ``png`` with ``--frame-codec jpeg95``: the same frame as JPEG
                   quality 95 (4:4:4), about 4x smaller and a few grey levels off
``gaze.png``       BDDA only: the gaze map as the loader resizes it, uint8 [H, W], 8-bit PNG;
                   the label is its value / 255, exactly
``fixations.npy``  float64 [N, 2]: every fixation of the frame as recorded (row = ``fixdata``
                   column 4, col = column 3, source pixels, nothing dropped or rounded); [0, 2]
                   for BDDA
``json``           dataset, split, video, frame, name, sizes, raw files (canonical JSON)
=================  ===========================================================================

keyed ``v{video:04d}_f{frame:06d}`` (:func:`sample_key`), in shards named
``<split>-NNNNNN.tar`` (:func:`shard_name`, :data:`pipeline.formats.manifest.SHARD_NAME`). The label
of a fixation dataset is not stored: :func:`decode_label` computes it from the fixations exactly
as the authors' loader does (:func:`pipeline.formats.labels.fixation_label` of the points the loader
marks, ≤ 1e-6 from the loader's own arithmetic), and the evaluation marks the raw points the
official MATLAB loop marks. Stable bytes come from fixed
encoder options (below; the encoders' versions go into the manifest) and a tar writer whose
headers carry no run-dependent data: every member has mtime ``TAR_MTIME``, uid/gid 0, empty
user/group names, mode 0o444, USTAR format, and the members of a sample are written in sorted
extension order (samples themselves keep the order they are given, which WebDataset needs).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.core.errors import BadInputError
from pipeline.core.fsio import Folder
from pipeline.formats.images import decode_gray_bytes, decode_rgb_bytes, image_size
from pipeline.formats.labels import fixation_label
from pipeline.formats.manifest import canonical_json, shard_urls

TAR_MTIME = 0
TAR_MODE = 0o444
JPEG_OPTIONS = {"quality": 95, "subsampling": 0, "optimize": False, "progressive": False}
"""Pillow JPEG options of the ``jpeg95`` frame codec: quality 95, 4:4:4 chroma, baseline."""
PNG_OPTIONS = {"compress_level": 1, "optimize": False}
"""Pillow PNG options: zlib level 1 (data/README.md has the sizes and speeds of the levels)."""

FRAME_CODECS = {"png": "png", "jpeg95": "jpg"}
"""Frame codec (``normalize --frame-codec``) -> the sample field that holds the frame."""
DEFAULT_FRAME_CODEC = "png"
GAZE, FIXATIONS, META = "gaze.png", "fixations.npy", "json"
"""The other fields of a sample (see the module docstring)."""


# ---- field encoders ------------------------------------------------------------------------


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB → baseline JPEG bytes (quality 95, 4:4:4), no metadata."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", **JPEG_OPTIONS)
    return buf.getvalue()


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] RGB or [H, W] grey → lossless PNG bytes (no metadata)."""
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3
                                                              and pixels.shape[2] == 3)):
        raise ValueError(f"expected uint8 [H, W, 3] or [H, W], got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L").save(buf, "PNG", **PNG_OPTIONS)
    return buf.getvalue()


def encode_frame(rgb: np.ndarray, codec: str = DEFAULT_FRAME_CODEC) -> tuple[str, bytes]:
    """(field, bytes) of a prepared frame uint8 [H, W, 3] in frame codec ``codec``."""
    if codec not in FRAME_CODECS:
        raise ValueError(f"frame codec must be one of {sorted(FRAME_CODECS)}, got {codec!r}")
    return FRAME_CODECS[codec], encode_png(rgb) if codec == "png" else encode_jpeg(rgb)


def encode_npy(array: np.ndarray) -> bytes:
    """Any array → ``.npy`` bytes (format version 1.0, C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---- samples ------------------------------------------------------------------------------


def sample_key(video: int, frame: int) -> str:
    """Sample ``__key__`` from video and frame numbers: 1, 6 → ``"v0001_f000006"``."""
    return f"v{video:04d}_f{frame:06d}"


def encode_sample(key: str, frame: np.ndarray, fixations: np.ndarray, meta: Mapping[str, Any],
                  gaze: np.ndarray | None = None, codec: str = DEFAULT_FRAME_CODEC
                  ) -> dict[str, Any]:
    """A sample from its parts: ``frame`` uint8 RGB [H, W, 3] (stored in frame codec
    ``codec``), ``fixations`` [N, 2] (row, col) as recorded, ``meta`` JSON-able (with
    ``source_size``), and for BDDA ``gaze``, the resized gaze map uint8 [H, W]."""
    field, data = encode_frame(frame, codec)
    sample = {
        "__key__": key,
        field: data,
        FIXATIONS: encode_npy(np.asarray(fixations, dtype=np.float64).reshape(-1, 2)),
        META: canonical_json(dict(meta)),
    }
    if gaze is not None:
        sample[GAZE] = encode_png(gaze)
    return sample


def _where(sample: Mapping[str, Any]) -> str:
    return sample.get("__url__", "?")


def _field(sample: Mapping[str, Any], field: str) -> bytes:
    """The bytes of ``field``; BadInputError naming the shard and sample when it is absent."""
    if field not in sample:
        raise BadInputError(_where(sample), f"sample {sample['__key__']} has no {field}")
    return sample[field]


def frame_field(sample: Mapping[str, Any]) -> str:
    """The field that holds the sample's frame (``png`` or ``jpg``); BadInputError naming the
    shard and sample when it has neither."""
    for field in FRAME_CODECS.values():
        if field in sample:
            return field
    raise BadInputError(_where(sample), f"sample {sample['__key__']} has no frame"
                        f" ({' or '.join(FRAME_CODECS.values())})")


def _check_shape(sample: Mapping[str, Any], field: str, shape: tuple[int, int],
                 size: tuple[int, int]) -> None:
    if tuple(shape) != tuple(size):
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: {field}"
                            f" is {shape[0]}x{shape[1]}, the run expects {size[0]}x{size[1]}")


def decode_frame(sample: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray:
    """The sample's frame, uint8 RGB [H, W, 3], which must be ``size`` (height, width: checked
    from the header before decoding); BadInputError naming the shard and sample otherwise."""
    field = frame_field(sample)
    data = sample[field]
    where = f"{_where(sample)}#{sample['__key__']}"
    _check_shape(sample, field, image_size(data, where), size)
    return decode_rgb_bytes(data, where, expect=size)


def decode_label(sample: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray:
    """The sample's label, float32 [H, W] in [0, 1], as the authors' loader makes it at
    ``size``: BDDA's stored gaze map / 255; else the fixation label of the recorded points
    (:func:`pipeline.formats.labels.fixation_label`, which marks :func:`pipeline.formats.labels.loader_points`)."""
    where = f"{_where(sample)}#{sample['__key__']}"
    if GAZE in sample:
        data = sample[GAZE]
        _check_shape(sample, GAZE, image_size(data, where), size)
        return decode_gray_bytes(data, where, expect=size).astype(np.float32) / 255.0
    source = decode_meta(sample).get("source_size")
    if not (isinstance(source, list) and len(source) == 2
            and all(isinstance(v, int) and v > 0 for v in source)):
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: {META} has no"
                            " source_size [height, width]")
    return fixation_label(decode_fixations(sample), size, tuple(source))


def decode_fixations(sample: Mapping[str, Any]) -> np.ndarray:
    """The sample's fixations as recorded, float64 [N, 2] (row, col in source pixels)."""
    try:
        points = decode_npy(_field(sample, FIXATIONS))
    except ValueError as err:
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: bad"
                            f" {FIXATIONS} ({err})") from None
    if points.ndim != 2 or points.shape[1] != 2 or points.dtype != np.float64:
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: {FIXATIONS} is"
                            f" {points.dtype} {list(points.shape)}, not float64 [N, 2]")
    return points


def decode_meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's metadata (dataset, split, video, frame, name, sizes, files)."""
    try:
        meta = json.loads(_field(sample, META))
    except ValueError as err:
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: bad"
                            f" {META} ({err})") from None
    if not isinstance(meta, dict):
        raise BadInputError(_where(sample), f"sample {sample['__key__']}: {META} is not an"
                            " object")
    return meta


# ---- tar writing ---------------------------------------------------------------------------


class _HashingWriter:
    """File-like wrapper that counts and sha256-hashes every byte written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar(samples: Iterable[dict[str, Any]], f: IO[bytes]) -> int:
    """Write ``samples`` as a deterministic WebDataset tar to ``f``; returns the sample count.

    Member names are ``<__key__>.<ext>``; keys must not contain "." or "/" and must be unique
    (WebDataset groups consecutive members by key).
    """
    seen: set[str] = set()
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if not key or "." in key or "/" in key or key in seen:
                raise ValueError(f"bad or repeated sample key {key!r}")
            seen.add(key)
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return len(seen)


MEMBER_NAME = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_.]+")
"""What a member of a salmm shard is called: ``<key>.<ext>``, no folder, no ``..``."""


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be part of a salmm shard (a link, a folder, a name with a
    folder, ``..`` or an absolute path), or None."""
    if not MEMBER_NAME.fullmatch(member.name) or ".." in member.name:
        return f"member {member.name!r} is not named <key>.<field>"
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "folder or device"
        return f"member {member.name!r} is a {kind}, not a file"
    return None


def iter_tar(f: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar, in order, as ``{"__key__": key, ext: bytes, ...}``.

    Raises ``tarfile.TarError`` for a damaged tar or a member that is not a plain
    ``<key>.<field>`` file (:func:`member_problem`).
    """
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            problem = member_problem(member)
            if problem is not None:
                raise tarfile.TarError(problem)
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


# ---- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One shard of a split, as its manifest lists it: ``url`` (local path or fsspec URL),
    ``samples`` (count), ``sha256`` (hex; None: not checked), ``first``, the index of its first
    sample within the split (shards are in manifest order), and ``size`` in bytes where known
    (a shard just written)."""

    url: str
    samples: int
    sha256: str | None = None
    first: int = 0
    size: int | None = None

    @property
    def end(self) -> int:
        """Index one past its last sample within the split."""
        return self.first + self.samples

    @property
    def name(self) -> str:
        """Its file name inside the prepared folder."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def manifest_entry(self) -> dict[str, Any]:
        """How the manifest lists it: {"name", "samples", "sha256"}."""
        return {"name": self.name, "samples": self.samples, "sha256": self.sha256}


def split_shards(prepared: str, manifest: Mapping[str, Any], split: str) -> list[Shard]:
    """The shards of ``split`` of the prepared dataset at ``prepared``, in manifest order."""
    entries = manifest["splits"][split]["shards"]
    shards, first = [], 0
    for url, entry in zip(shard_urls(prepared, manifest, split), entries, strict=True):
        shards.append(Shard(url, int(entry["samples"]), entry.get("sha256"), first))
        first += int(entry["samples"])
    return shards


class _HashingReader:
    """File-like wrapper that sha256-hashes every byte read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._digest.update(data)
        return data

    def drain(self) -> str:
        """Read (and hash) what is left; the hex digest of the whole file."""
        while self.read(1 << 20):
            pass
        return self._digest.hexdigest()


def read_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order, ``{"__key__", "__url__", "__index__", ext: bytes,
    ...}`` (``__index__``: the sample's place in its split, ``shard.first`` + its place here).

    Every byte is hashed as it is read; the last sample is yielded only after the whole file
    was read and matched ``shard.sha256`` and the sample count matched ``shard.samples``, so a
    consumer that commits work only at a shard's end never commits work made from a changed
    shard.

    Raises:
        BadInputError (naming the shard): missing, not a readable tar, another sha256 than the
            manifest's, or another number of samples.
    """
    url = shard.url
    count, held = 0, None
    try:
        with fsspec.open(url, "rb") as f:
            reader = _HashingReader(f)
            for sample in iter_tar(reader):
                sample["__url__"] = url
                sample["__index__"] = shard.first + count
                if held is not None:
                    yield held
                held, count = sample, count + 1
            digest = reader.drain()
    except (tarfile.TarError, EOFError) as err:
        raise BadInputError(url, f"unreadable shard: {err}") from None
    except FileNotFoundError:
        raise BadInputError(url, "shard listed in the manifest is missing") from None
    if shard.sha256 is not None and digest != shard.sha256:
        raise BadInputError(url, f"sha256 {digest[:16]}… differs from the manifest's"
                            f" {shard.sha256[:16]}…: the shard changed after normalize wrote it"
                            " (`python -m pipeline verify` lists every difference)")
    if count != shard.samples:
        raise BadInputError(url, f"has {count} samples, the manifest says {shard.samples}")
    if held is not None:
        yield held


# ---- shard commit --------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    """``train``, 3 → ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def write_shard(folder: Folder, name: str, samples: Iterable[dict[str, Any]]) -> Shard:
    """Write ``samples`` to ``folder/name`` atomically (temporary name, fsync, rename); the
    committed shard.

    The sha256 is computed from the bytes as they are written, so committing costs no re-read.
    """
    with folder.atomic_writer(name) as f:
        out = _HashingWriter(f)
        count = write_tar(samples, out)
    return Shard(folder.url(name), count, out.hexdigest(), size=out.size)
