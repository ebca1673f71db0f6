"""The per-frame work of normalize (it runs on Dask workers): read a frame's raw files once,
fingerprint them, decode, resize, make the label, encode the sample."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.cpu import reuse_freed_memory
from pipeline.core.errors import BadInputError
from pipeline.core.fsio import file_fingerprint, relative_to
from pipeline.datasets import get as dataset_entry
from pipeline.datasets.matfile import load_fixation_map
from pipeline.datasets.spec import Frame
from pipeline.formats import images, labels, video
from pipeline.formats.shards import encode_sample, sample_key
from pipeline.normalize.settings import Options


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


def fingerprint(path: Path, root: Path) -> tuple[str, int, str]:
    """(path relative to ``root``, bytes, sha256) of a raw file; BadInputError if unreadable."""
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


def decode_video_frame(frame: Frame, root: Path
                       ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, str]]]:
    """A video dataset's frame (uint8 [H, W, 3] RGB), its gaze map (uint8 [h, w]) and the
    frame's input fingerprints: ``"<video>#<index>"``, the decoded pixels' bytes and sha256 (the
    videos hold thousands of frames each: a frame's input is its pixels, not the whole file),
    then DADA-2000's fixation-map file, if any. The frame must be its dataset's frame size, the
    map at most that; BadInputError otherwise, or when either cannot be decoded."""
    entry = dataset_entry(frame.dataset)
    images.check_dimensions(video.open_video(frame.image_path).info.size, frame.image_path,
                            expect=entry.frame_size)     # from the headers, before decoding
    images.check_dimensions(video.open_video(frame.gaze_map_path).info.size,
                            frame.gaze_map_path, bound=entry.frame_size)
    rgb = video.read_frame(frame.image_path, frame.video_index)
    gray = video.read_map(frame.gaze_map_path, frame.video_index,
                          getattr(cv2, f"COLOR_{entry.map_conversion}"))
    inputs = [(f"{relative_to(path, root)}#{frame.video_index}", pixels.nbytes,
               hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest())
              for path, pixels in ((frame.image_path, rgb), (frame.gaze_map_path, gray))]
    if frame.fixation_path is not None:
        inputs.append(fingerprint(frame.fixation_path, root))
    return rgb, gray, inputs


def decode_raw(frame: Frame, options: Options, raw: dict[Path, bytes],
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """The camera frame (uint8 [H, W, 3] RGB) and, for BDDA, the gaze map (uint8 [h, w]), decoded
    as ``options.decode`` says from ``raw`` (path -> bytes of :func:`raw_files`). A frame must be
    its dataset's frame size, a gaze map at most that (:mod:`pipeline.datasets`); both are
    checked from the header before anything is decoded."""
    image, gaze = frame.image_path, frame.gaze_map_path
    size = dataset_entry(frame.dataset).frame_size
    frame_size = {"expect": size}           # checked from the header, before decoding
    map_size = {"bound": size}
    if options.decode == "fast":
        rgb = images.decode_reduced_bytes(raw[image], image, options.size, "RGB", **frame_size)
        gray = (images.decode_reduced_bytes(raw[gaze], gaze, options.size, "L", **map_size)
                if gaze else None)
    else:
        rgb = images.decode_rgb_bytes(raw[image], image, **frame_size)
        gray = images.decode_gray_bytes(raw[gaze], gaze, **map_size) if gaze else None
    return rgb, gray


def prepare_frame(frame: Frame, root: Path, options: Options) -> Prepared:
    """All per-frame work for one frame: read (once), fingerprint, decode, resize, encode (the
    frame, the resized gaze map of BDDA, the fixations as recorded).

    Returns the sample (:func:`pipeline.formats.shards.encode_sample`); raises BadInputError for a
    missing, corrupt or wrongly sized file.
    """
    if frame.video_index is not None:
        rgb, gray, inputs = decode_video_frame(frame, root)
    else:
        raw = {path: images.read_image_bytes(path) for path in raw_files(frame)}
        rgb, gray = decode_raw(frame, options, raw)
        inputs = [(relative_to(path, root), len(data), hashlib.sha256(data).hexdigest())
                  for path, data in raw.items()]
    points = frame.fixations
    if frame.fixation_path is not None:      # DADA-2000: the frame's fixation map
        points = load_fixation_map(frame.fixation_path, dataset_entry(frame.dataset).frame_size)
    small = images.resize_frame(rgb, options.size)
    gaze = None
    if gray is None:
        files = {"image": relative_to(frame.image_path, root),
                 "fixdata": relative_to(dataset_entry(frame.dataset).fixdata_file(
                     root, frame.video), root)}
    else:
        gaze = labels.gaze_map_resized(gray, size=options.size)
        files = {"image": relative_to(frame.image_path, root),
                 "gaze_map": relative_to(frame.gaze_map_path, root)}
        if frame.video_index is not None:
            files["index"] = frame.video_index
        if frame.fixation_path is not None:
            files["fixations"] = relative_to(frame.fixation_path, root)
    meta = {
        "dataset": frame.dataset, "split": frame.split, "video": frame.video,
        "frame": frame.frame, "name": frame.name,
        "source_size": list(frame.source_size), "image_size": list(rgb.shape[:2]),
        "files": files,
    }
    sample = encode_sample(sample_key(frame.video, frame.frame), small, points, meta,
                           gaze=gaze, codec=options.frame_codec)
    return Prepared(sample, inputs)


def prepare_chunk(frames: list[Frame], root: str, options: Options) -> list[Prepared | Bad]:
    """Dask task: ``prepare_frame`` over a few frames; bad frames come back as ``Bad`` records
    (exceptions with custom constructors do not survive pickling between processes)."""
    cv2.setNumThreads(1)
    reuse_freed_memory()        # Dask's workers hand freed memory back to the kernel at once
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
            if frame.video_index is not None:
                out.append(decode_video_frame(frame, Path(root))[2])
                continue
            out.append([fingerprint(path, Path(root)) for path in raw_files(frame)])
        except BadInputError as err:
            out.append(Bad.from_error(frame.name, err, Path(root)))
    return out


def fingerprint_files(paths: list[str], root: str) -> dict[str, dict[str, Any]]:
    """Dask task: {relative path: {size, sha256}} of whole-dataset files (fixdata), skipping
    missing ones (the readers report those per frame)."""
    out = {}
    for path in paths:
        if Path(path).is_file():
            rel, size, sha = fingerprint(Path(path), Path(root))
            out[rel] = {"size": size, "sha256": sha}
    return out
